"""Router: least-loaded replica first, ties round robin, routed-but-preprocessing counts; a
server over two replicas answers like the reference decoder and uses both."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from openai_helpers import API_KEY, MODEL_NAME, ServerThread, make_replica, wait_until_idle

from serving.engine import RequestOutput
from serving.openai_api import create_app
from serving.router import Router
from visualchat.messages import Conversation
from visualchat.sampling import SamplingParams


class FakeLoop:
    """An EngineLoop stand-in: a settable load, a process() that can be held, one output."""

    def __init__(self, name: str, num_active: int = 0) -> None:
        self.name = name
        self.num_active = num_active
        self.release = threading.Event()
        self.release.set()
        self.engine = SimpleNamespace(process=self._process)
        self.served: list[object] = []

    def _process(self, conversation, limits=None):
        self.release.wait(timeout=10)
        return ("processed", conversation)

    async def astream_outputs(self, inputs, params, limits=None):
        self.served.append(inputs)
        yield RequestOutput(self.name, self.name, [1], True, "stop", 3, 1)


def test_the_least_loaded_replica_is_picked() -> None:
    loops = [FakeLoop("a", 2), FakeLoop("b", 0), FakeLoop("c", 1)]
    router = Router(loops)
    assert router.pick() == 1
    loops[1].num_active = 5
    assert router.pick() == 2
    assert router.num_active == 2 + 5 + 1


def test_ties_go_round_robin() -> None:
    loops = [FakeLoop("a", 1), FakeLoop("b", 0), FakeLoop("c", 0), FakeLoop("d", 0)]
    router = Router(loops)
    assert [router.pick() for _ in range(6)] == [1, 2, 3, 1, 2, 3]
    loops[0].num_active = 0
    assert [router.pick() for _ in range(4)] == [0, 1, 2, 3]


def test_requests_count_against_their_replica_while_preprocessing() -> None:
    loops = [FakeLoop("a"), FakeLoop("b")]
    for loop in loops:
        loop.release.clear()  # hold both in preprocessing
    router = Router(loops)

    async def scenario() -> list[str]:
        async def one() -> str:
            return [o.delta async for o in router.astream_outputs("conv", SamplingParams())][0]

        first = asyncio.ensure_future(one())
        await asyncio.sleep(0.05)
        assert router.loads() == [1, 0]
        second = asyncio.ensure_future(one())
        await asyncio.sleep(0.05)
        assert router.loads() == [1, 1]
        for loop in loops:
            loop.release.set()
        return list(await asyncio.gather(first, second))

    assert asyncio.run(scenario()) == ["a", "b"]
    assert router.loads() == [0, 0]
    assert [loop.served for loop in loops] == [[("processed", "conv")], [("processed", "conv")]]


def test_a_router_needs_a_replica() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Router([])


def test_two_replica_server_answers_like_the_reference(tiny_model, reference) -> None:
    replicas = [make_replica(*tiny_model) for _ in range(2)]
    messages = [{"role": "user", "content": "The quick brown fox"}]
    expected = reference.generate(
        Conversation.from_openai(messages), SamplingParams(max_tokens=6)
    ).text
    app = create_app(Router([r.loop for r in replicas]), MODEL_NAME, api_key=API_KEY)
    body = {"messages": messages, "max_tokens": 6, "temperature": 0}
    try:
        with (
            ServerThread(app) as running,
            httpx.Client(
                base_url=running.base_url,
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            ) as http,
        ):
            with ThreadPoolExecutor(max_workers=6) as pool:
                responses = list(
                    pool.map(lambda _: http.post("/v1/chat/completions", json=body), range(6))
                )
            texts = [r.json()["choices"][0]["message"]["content"] for r in responses]
            assert texts == [expected] * 6
            assert all(r.engine.num_steps > 0 for r in replicas), "both replicas should serve"
            for r in replicas:
                wait_until_idle(r.engine)
    finally:
        for r in replicas:
            r.loop.shutdown()
