"""EngineLoop: the engine on a background thread serving many callers; EngineBackend under
ChatSession; early close, errors and shutdown."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from engine_testing import (
    GREEDY,
    IMAGES,
    WORKLOAD,
    make_engine,
    reference,
    reference_output,
)
from factories import make_conversation

from serving.engine import EngineBackend, EngineLoop
from visualchat.images import ImageError, ImageLimits
from visualchat.processor import ContextLengthError, ProcessedInputs
from visualchat.sampling import SamplingParams
from visualchat.session import ChatSession

LONG = SamplingParams(max_tokens=380, ignore_eos=True)  # far longer than any test waits


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def is_idle(loop: EngineLoop) -> bool:
    engine = loop.engine
    return (
        not engine.requests
        and engine.blocks.num_used_blocks == 0
        and not engine.scheduler.running
        and not engine.scheduler.waiting
        and loop.num_active == 0
    )


@pytest.fixture
def loop() -> Iterator[EngineLoop]:
    engine_loop = EngineLoop(make_engine(max_num_batched_tokens=13))
    yield engine_loop
    engine_loop.shutdown()


def test_concurrent_streams_get_the_reference_text(loop: EngineLoop) -> None:
    def text_of(i: int) -> str:
        return "".join(loop.stream(WORKLOAD[i], GREEDY))

    def outputs_of(i: int) -> tuple[list[int], str | None]:
        ids, reason = [], None
        for out in loop.stream_outputs(WORKLOAD[i], GREEDY):
            ids += out.new_token_ids
            reason = out.finish_reason
        return ids, reason

    with ThreadPoolExecutor(max_workers=len(WORKLOAD)) as pool:
        texts = [pool.submit(text_of, i) for i in range(len(WORKLOAD))]
        tokens = [pool.submit(outputs_of, i) for i in range(len(WORKLOAD))]
        for i, (text, ids) in enumerate(zip(texts, tokens, strict=True)):
            expected = reference_output(i, GREEDY)
            assert text.result(timeout=60) == expected.text, i
            assert ids.result(timeout=60) == (expected.token_ids, expected.finish_reason), i
    wait_until(lambda: is_idle(loop))
    assert loop.engine.image_cache.num_encoded == 4
    assert loop.engine.num_steps > 1


def test_closing_a_stream_early_aborts_its_request(loop: EngineLoop) -> None:
    outputs = loop.stream_outputs(WORKLOAD[3], LONG)
    first = next(outputs)
    request = loop.engine.requests.get(first.request_id)
    assert request is not None and not first.finished
    outputs.close()
    wait_until(lambda: is_idle(loop))
    assert request.finish_reason == "abort" and len(request.output_ids) < LONG.max_tokens
    assert request.block_table == []


def test_closing_a_text_stream_early_aborts_its_request(loop: EngineLoop) -> None:
    deltas = loop.stream(WORKLOAD[2], LONG)
    assert next(deltas)
    wait_until(lambda: len(loop.engine.requests) == 1)
    (request,) = loop.engine.requests.values()
    deltas.close()
    wait_until(lambda: is_idle(loop))
    assert request.finish_reason == "abort" and len(request.output_ids) < LONG.max_tokens


def test_chat_session_over_the_engine_matches_the_reference_session(loop: EngineLoop) -> None:
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    served = ChatSession(EngineBackend(loop), system="be brief", params=params)
    local = ChatSession(reference(), system="be brief", params=params)
    red, green, blue = IMAGES[:3]
    for session in (served, local):
        session.send("Compare these.", images=[red, green])
        session.send("And this one?", images=[blue])
    assert [m.role for m in served.messages] == ["system", *["user", "assistant"] * 2]
    replies = [m.text for m in served.messages if m.role == "assistant"]
    assert all(replies) and replies[0] != replies[1]
    assert [(m.role, m.text) for m in served.messages] == [(m.role, m.text) for m in local.messages]
    assert loop.engine.image_cache.num_encoded == 3
    wait_until(lambda: is_idle(loop))

    # a reply stopped early keeps its partial text, and the engine frees the request
    stream = served.stream("Describe all three, at length.", max_tokens=380)
    shown = next(stream)
    stream.close()
    assert served.messages[-1].role == "assistant" and served.messages[-1].text == shown
    wait_until(lambda: is_idle(loop))


def test_errors_reach_the_caller_and_the_loop_keeps_serving(loop: EngineLoop) -> None:
    session = ChatSession(EngineBackend(loop), params=GREEDY)
    with pytest.raises(ImageError, match="Image 1"):
        session.send("look", images=[b"not an image"])
    assert session.messages == []  # rolled back

    too_long = ProcessedInputs(
        input_ids=torch.full((2000,), 5, dtype=torch.long),
        token_modality=torch.zeros(2000, dtype=torch.long),
        image_spans=[],
        pixel_values=None,
    )
    with pytest.raises(ContextLengthError):
        list(loop.stream_outputs(too_long, GREEDY))

    # a pass that fails fails its requests, not the loop
    execute = loop.engine.runner.execute
    failures = iter([RuntimeError("pass failed")])

    def failing_once(chunks):
        for error in failures:
            raise error
        return execute(chunks)

    loop.engine.runner.execute = failing_once
    with pytest.raises(RuntimeError, match="pass failed"):
        list(loop.stream(WORKLOAD[1], GREEDY))
    wait_until(lambda: is_idle(loop))

    assert "".join(loop.stream(WORKLOAD[0], GREEDY)) == reference_output(0, GREEDY).text
    assert session.send("hello world") == reference_output(0, GREEDY).text
    wait_until(lambda: is_idle(loop))


def test_shutdown_ends_the_thread_and_fails_open_streams() -> None:
    engine_loop = EngineLoop(make_engine(max_num_batched_tokens=13))
    assert engine_loop._thread.is_alive()
    outputs = engine_loop.stream_outputs(WORKLOAD[1], LONG)
    next(outputs)
    engine_loop.shutdown()
    assert not engine_loop._thread.is_alive()
    with pytest.raises(RuntimeError, match="engine loop stopped"):
        for _ in outputs:
            pass
    engine = engine_loop.engine
    assert not engine.requests and engine.blocks.num_used_blocks == 0
    with pytest.raises(RuntimeError, match="stopped"):
        engine_loop.submit(WORKLOAD[0], GREEDY)
    assert not any(t.name == "visualchat-engine" and t.is_alive() for t in threading.enumerate())


def test_a_request_submitted_as_the_loop_shuts_down_is_answered() -> None:
    """A caller blocks on its queue until something arrives: a submission still in the inbox
    when the loop stops must get an error, or stream_outputs() waits forever."""
    engine_loop = EngineLoop(make_engine(max_num_batched_tokens=13))
    execute = engine_loop.engine.runner.execute
    in_pass = threading.Event()

    def slow(chunks):
        in_pass.set()
        time.sleep(0.3)
        return execute(chunks)

    busy = engine_loop.stream_outputs(WORKLOAD[1], LONG)
    next(busy)
    engine_loop.engine.runner.execute = slow
    assert in_pass.wait(timeout=10)  # the loop thread is inside a pass
    _, sink = engine_loop.submit(WORKLOAD[0], GREEDY)  # lands in the inbox
    engine_loop.shutdown()
    assert not engine_loop._thread.is_alive()
    try:
        item = sink.get(timeout=1)
    except queue.Empty:
        pytest.fail("the submission was dropped at shutdown: its caller would wait forever")
    assert isinstance(item, RuntimeError)


def test_async_streams_match_and_cancelling_aborts(loop: EngineLoop) -> None:
    async def collect(i: int) -> list[int]:
        ids = []
        async for out in loop.astream_outputs(WORKLOAD[i], GREEDY):
            ids += out.new_token_ids
        return ids

    async def first_then_stop() -> str:
        outputs = loop.astream_outputs(WORKLOAD[2], LONG)
        first = await anext(outputs)
        await outputs.aclose()
        return first.request_id

    async def main() -> tuple[list[list[int]], str]:
        streams = await asyncio.gather(*(collect(i) for i in range(4)))
        return streams, await first_then_stop()

    streams, stopped = asyncio.run(main())
    assert streams == [reference_output(i, GREEDY).token_ids for i in range(4)]
    wait_until(lambda: is_idle(loop))
    assert stopped.startswith("loop-")


def test_per_request_image_limits_are_checked_in_the_caller(loop: EngineLoop) -> None:
    two_images = make_conversation([IMAGES[0], IMAGES[1], "two"])
    with pytest.raises(ImageError, match="too many images: 2"):
        loop.submit(two_images, GREEDY, limits=ImageLimits(max_images=1))
    assert loop.num_active == 0
    ids = [out.new_token_ids[0] for out in loop.stream_outputs(WORKLOAD[1], GREEDY)]
    assert ids == reference_output(1, GREEDY).token_ids


def test_an_abort_from_elsewhere_ends_the_readers_stream_cleanly(loop: EngineLoop) -> None:
    outputs = loop.stream_outputs(WORKLOAD[0], LONG)
    first = next(outputs)
    loop.abort(first.request_id)
    rest = list(outputs)  # ends without an exception
    assert rest and rest[-1].finished and rest[-1].finish_reason == "abort"
    assert all(not out.finished for out in rest[:-1])
    assert 1 + sum(len(out.new_token_ids) for out in rest) < LONG.max_tokens
    wait_until(lambda: is_idle(loop))


def test_a_caller_named_request_can_be_aborted_by_another_thread(loop: EngineLoop) -> None:
    """The web chat's Stop: the request is named before it exists, and aborted by that name from
    a thread that never sees its stream."""
    outputs = loop.stream_outputs(WORKLOAD[1], LONG, request_id="chat-1")
    first = next(outputs)
    assert first.request_id == "chat-1" and "chat-1" in loop.engine.requests
    stopper = threading.Thread(target=loop.abort, args=("chat-1",))
    stopper.start()
    rest = list(outputs)
    stopper.join()
    assert rest[-1].finish_reason == "abort"
    assert 1 + sum(len(out.new_token_ids) for out in rest) < LONG.max_tokens
    wait_until(lambda: is_idle(loop))

    # a name in use is refused to the second caller only; the first keeps its stream
    first_stream = loop.stream_outputs(WORKLOAD[1], LONG, request_id="chat-2")
    assert next(first_stream).request_id == "chat-2"
    with pytest.raises(ValueError, match="already in use"):
        next(loop.stream_outputs(WORKLOAD[2], GREEDY, request_id="chat-2"))
    assert not next(first_stream).finished
    first_stream.close()
    wait_until(lambda: is_idle(loop))


def test_build_makes_the_engine_on_the_loop_thread_and_serves() -> None:
    built_on: list[threading.Thread] = []

    def make() -> object:
        built_on.append(threading.current_thread())
        return make_engine(max_num_batched_tokens=13)

    engine_loop = EngineLoop.build(make)
    try:
        # Loading, the budget probe and every step run on the one thread (one OpenMP team).
        assert built_on == [engine_loop._thread]
        outputs = list(engine_loop.stream_outputs(WORKLOAD[2], GREEDY))
        tokens = [t for out in outputs for t in out.new_token_ids]
        assert tokens == reference_output(2, GREEDY).token_ids
    finally:
        engine_loop.shutdown()
    assert not engine_loop._thread.is_alive()


def test_build_hands_a_failed_engine_s_error_to_the_caller() -> None:
    def fail() -> object:
        raise OSError("no such checkpoint")

    with pytest.raises(OSError, match="no such checkpoint"):
        EngineLoop.build(fail)
    wait_until(lambda: not any(t.name == "visualchat-engine" for t in threading.enumerate()))
