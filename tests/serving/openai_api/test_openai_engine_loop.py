"""What the HTTP server needs from EngineLoop. These pin two engine-loop defects found
while building the server (preprocessing on the event loop; submissions lost at shutdown), now
fixed."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest
from factories import make_conversation
from openai_helpers import make_replica, wait_until_idle

from visualchat.sampling import SamplingParams


@pytest.fixture
def own_replica(tiny_model):
    replica = make_replica(*tiny_model)
    yield replica
    replica.loop.shutdown()


async def max_event_loop_stall(work) -> float:
    """Run `work` while a ticker measures the longest gap between its ticks (seconds)."""
    gaps = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    try:
        await work
    finally:
        done.set()
        await tick
    return max(gaps)


def slow_preprocessing(replica, monkeypatch, seconds: float = 0.5) -> None:
    real_process = replica.engine.process

    def process(conversation, limits=None):
        time.sleep(seconds)  # stands in for decoding a large image
        return real_process(conversation, limits)

    monkeypatch.setattr(replica.engine, "process", process)


def test_router_preprocesses_off_the_event_loop(own_replica, monkeypatch) -> None:
    from serving.router import Router

    slow_preprocessing(own_replica, monkeypatch)
    router = Router([own_replica.loop])

    async def one() -> None:
        params = SamplingParams(max_tokens=2)
        async for _ in router.astream_outputs(make_conversation("hello"), params):
            pass

    assert asyncio.run(max_event_loop_stall(one())) < 0.3
    wait_until_idle(own_replica.engine)


def test_engine_loop_astream_outputs_preprocesses_off_the_event_loop(
    own_replica, monkeypatch
) -> None:
    slow_preprocessing(own_replica, monkeypatch)

    async def one() -> None:
        params = SamplingParams(max_tokens=2)
        async for _ in own_replica.loop.astream_outputs(make_conversation("hello"), params):
            pass

    assert asyncio.run(max_event_loop_stall(one())) < 0.3


def test_shutdown_answers_submissions_still_in_the_inbox(own_replica, monkeypatch) -> None:
    engine, loop = own_replica.engine, own_replica.loop
    real_step = engine.step
    stepping = threading.Event()

    def slow_step():
        stepping.set()
        time.sleep(0.3)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    loop.submit(make_conversation("hello"), params)
    assert stepping.wait(timeout=10)
    _, late_sink = loop.submit(make_conversation("the quick brown fox"), params)  # in the inbox
    loop.shutdown()
    try:
        answer = late_sink.get(timeout=1)
    except queue.Empty:
        pytest.fail("a request submitted before shutdown() never got an answer")
    assert isinstance(answer, RuntimeError)
