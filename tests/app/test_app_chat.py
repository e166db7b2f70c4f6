"""The web chat's chat function without a browser: engine text equals the reference decoder's for
both Gradio history shapes, bad input becomes a readable reply, and both ways of stopping a reply
(closing the generator, as Gradio's cancel does; a ReplyControl, as the page's Stop does) abort
the engine request and free its blocks."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_testing import (
    image_files,
    is_growing,
    is_idle,
    make_loop,
    reference,
    wait_until,
)

from app.chat import ChatSettings, Reply, ReplyControl, make_chat_fn, stream_reply
from serving.engine import EngineLoop
from visualchat.images import ImageLimits
from visualchat.messages import Conversation
from visualchat.sampling import SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS)
FIRST_REPLY = "The first image is red, the second image is green."


@pytest.fixture(scope="module")
def loop() -> Iterator[EngineLoop]:
    engine_loop = make_loop()
    yield engine_loop
    engine_loop.shutdown()


@pytest.fixture
def slow_loop() -> Iterator[EngineLoop]:
    """Replies that never stop at EOS and take ~10 ms a token: long enough to stop."""
    engine_loop = make_loop(step_delay=0.01, ignore_eos=True)
    yield engine_loop
    engine_loop.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return image_files(tmp_path_factory.mktemp("images"))


def client_history(images: dict[str, str]) -> list[dict]:
    """What gradio_client sends and ChatInterface keeps: one entry per uploaded file."""
    return [
        {"role": "user", "content": {"path": images["red"]}},
        {"role": "user", "content": {"path": images["green"]}},
        {"role": "user", "content": "Compare the two images."},
        {"role": "assistant", "content": FIRST_REPLY},
    ]


def browser_history(images: dict[str, str]) -> list[dict]:
    """The same history as a chat function receives it from the browser (normalized)."""
    import gradio as gr
    from gradio.components.chatbot import ChatbotDataMessages

    chatbot = gr.Chatbot()
    sent = chatbot.postprocess(client_history(images))
    received = ChatbotDataMessages.model_validate(sent.model_dump())
    history = chatbot.preprocess(received)
    assert history[0]["content"][0]["type"] == "file"  # really the other shape
    return history


def expected_conversation(images: dict[str, str], system: str | None = None) -> Conversation:
    conversation = Conversation()
    if system is not None:
        conversation.add_system(system)
    conversation.add_user("Compare the two images.", images=[images["red"], images["green"]])
    conversation.add_assistant(FIRST_REPLY)
    conversation.add_user("And what about image 3?", images=[images["blue"]])
    return conversation


@pytest.mark.parametrize("shape", ["client", "browser"])
def test_streamed_reply_equals_the_reference_decoder(
    loop: EngineLoop, images: dict[str, str], shape: str
) -> None:
    history = client_history(images) if shape == "client" else browser_history(images)
    message = {"text": "And what about image 3?", "files": [images["blue"]]}
    chat = make_chat_fn(loop)
    texts = list(chat(message, history, MAX_TOKENS, 0.0, 1.0, ""))
    expected = reference().generate(expected_conversation(images), GREEDY)
    assert expected.text  # the test says something only if the reply is not empty
    assert texts[-1] == expected.text
    assert len(texts) > 1 and is_growing(texts)  # streamed, piece by piece
    wait_until(lambda: is_idle(loop))


def test_system_prompt_and_finish_reason(loop: EngineLoop, images: dict[str, str]) -> None:
    message = {"text": "And what about image 3?", "files": [images["blue"]]}
    settings = ChatSettings(max_tokens=MAX_TOKENS, system_prompt="Be brief.")
    replies = list(stream_reply(loop, client_history(images), message, settings))
    expected = reference().generate(expected_conversation(images, system="Be brief."), GREEDY)
    assert replies[-1] == Reply(expected.text, finish_reason=expected.finish_reason)
    assert not any(reply.is_error for reply in replies)
    assert all(reply.finish_reason is None for reply in replies[:-1])


def test_retry_answers_the_last_user_turn_of_the_history(
    loop: EngineLoop, images: dict[str, str]
) -> None:
    history = client_history(images)[:-1]  # ends with the user turn; no new message
    replies = list(stream_reply(loop, history, None, ChatSettings(max_tokens=MAX_TOKENS)))
    conversation = Conversation()
    conversation.add_user("Compare the two images.", images=[images["red"], images["green"]])
    assert replies[-1].text == reference().generate(conversation, GREEDY).text


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


BAD_INPUTS = {
    # name: (history, message files, text, settings, limits, expected start of the warning)
    "not an image": (
        "one image",
        ["red", "notes.txt"],
        "what is this?",
        {},
        None,
        "⚠️ Image 3: notes.txt is not an image (text/plain); only image files can be sent",
    ),
    "corrupt image": (
        None,
        ["green", "fake.png"],
        "and these?",
        {},
        None,
        "⚠️ Image 2 (fake.png): not an image, or an unsupported format",
    ),
    "oversized image": (
        None,
        ["red"],
        "hi",
        {},
        ImageLimits(max_pixels=100),
        "⚠️ Image 1 (red.png): too many pixels: 40x30 = 1200 (max 100 pixels",
    ),
    "too many images": (
        "one image",
        ["green", "blue"],
        "hi",
        {},
        ImageLimits(max_images=2),
        "⚠️ too many images: 3 (max 2 per conversation",
    ),
    "over-long conversation": (
        None,
        [],
        "word " * 600,
        {},
        None,
        "⚠️ the conversation is",
    ),
    "bad history": (
        "bad role",
        [],
        "hi",
        {},
        None,
        "⚠️ history[0]: unsupported role 'bot'",
    ),
    "bad setting": (None, [], "hi", {"top_p": 0.0}, None, "⚠️ top_p must be in (0, 1], got 0.0"),
    "empty message": (None, [], "", {}, None, "⚠️ Type a question or attach an image first."),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_becomes_a_readable_reply(
    loop: EngineLoop, images: dict[str, str], tmp_path: Path, case: str
) -> None:
    history_kind, file_names, text, setting, limits, warning = BAD_INPUTS[case]
    files = {
        **images,
        "notes.txt": _write(tmp_path / "notes.txt", b"just text\n"),
        "fake.png": _write(tmp_path / "fake.png", b"not a png at all"),
    }
    history = {
        None: [],
        "one image": [
            {"role": "user", "content": [{"path": images["yellow"]}, "what is it?"]},
            {"role": "assistant", "content": "yellow"},
        ],
        "bad role": [{"role": "bot", "content": "x"}],
    }[history_kind]
    message = {"text": text, "files": [files[name] for name in file_names]}
    settings = ChatSettings(**{"max_tokens": MAX_TOKENS, **setting})
    replies = list(stream_reply(loop, history, message, settings, limits or ImageLimits()))
    assert len(replies) == 1
    assert replies[0].is_error and replies[0].finish_reason is None
    assert replies[0].text.startswith(warning), replies[0].text
    assert "Traceback" not in replies[0].text
    # the loop keeps serving
    wait_until(lambda: is_idle(loop))
    good = list(stream_reply(loop, [], "hello", ChatSettings(max_tokens=MAX_TOKENS)))
    assert not good[-1].is_error and good[-1].finish_reason in ("stop", "length")


def test_a_prompt_over_the_cache_becomes_a_readable_reply() -> None:
    engine_loop = make_loop(num_blocks=8)  # 32 cache tokens: the prompt cannot be admitted
    try:
        replies = list(stream_reply(engine_loop, [], "The quick brown fox jumps " * 8))
    finally:
        engine_loop.shutdown()
    assert replies == [Reply(replies[0].text, is_error=True)]
    assert replies[0].text.startswith("⚠️ the prompt is "), replies[0].text


def test_closing_the_generator_aborts_the_request_and_frees_its_blocks(
    slow_loop: EngineLoop, images: dict[str, str]
) -> None:
    chat = make_chat_fn(slow_loop)
    message = {"text": "Describe it at length.", "files": [images["red"]]}
    texts = chat(message, [], 400)
    assert next(texts)
    (request,) = slow_loop.engine.requests.values()
    assert request.block_table
    texts.close()
    wait_until(lambda: is_idle(slow_loop))
    assert request.finish_reason == "abort"
    assert request.block_table == []
    assert 0 < len(request.output_ids) < 400


def test_gradio_cancel_closes_the_generator_while_a_token_is_awaited(
    slow_loop: EngineLoop, images: dict[str, str]
) -> None:
    """Gradio's Stop: the event task is cancelled while a worker thread waits in `next()`, then
    `SyncToAsyncIterator.aclose()` retries `close()` until that `next()` returns."""
    from gradio.utils import SyncToAsyncIterator

    chat = make_chat_fn(slow_loop)
    message = {"text": "Describe it at length.", "files": [images["green"]]}
    requests = []

    async def stop_while_streaming() -> None:
        iterator = SyncToAsyncIterator(chat(message, [], 400), limiter=None)
        await iterator.__anext__()
        requests.extend(slow_loop.engine.requests.values())
        in_flight = asyncio.ensure_future(iterator.__anext__())  # a thread waits for a token
        await asyncio.sleep(0.005)
        await iterator.aclose()
        with contextlib.suppress(StopAsyncIteration):  # if close() won the race
            await asyncio.wait_for(in_flight, timeout=10)

    asyncio.run(stop_while_streaming())
    wait_until(lambda: is_idle(slow_loop))
    (request,) = requests
    assert request.finish_reason == "abort" and request.block_table == []
    assert len(request.output_ids) < 400


def test_a_control_stops_the_reply_from_another_thread(
    slow_loop: EngineLoop, images: dict[str, str]
) -> None:
    control = ReplyControl(slow_loop)
    message = {"text": "Describe it at length.", "files": [images["blue"]]}
    replies = stream_reply(slow_loop, [], message, ChatSettings(max_tokens=400), control=control)
    first = next(replies)
    (request,) = slow_loop.engine.requests.values()
    assert request.request_id == control.request_id
    stopper = threading.Thread(target=control.stop)  # the Stop button's event
    stopper.start()
    rest = list(replies)  # ends by itself, without being closed
    stopper.join()
    assert rest[-1].finish_reason == "abort" and rest[-1].text.startswith(first.text)
    wait_until(lambda: is_idle(slow_loop))
    assert request.finish_reason == "abort" and request.block_table == []
    assert len(request.output_ids) < 400


def test_a_reply_stopped_before_it_began_asks_the_engine_nothing(slow_loop: EngineLoop) -> None:
    control = ReplyControl(slow_loop)
    control.stop()
    assert list(stream_reply(slow_loop, [], "hello", control=control)) == [
        Reply("", finish_reason="abort")
    ]
    assert slow_loop.engine.num_steps == 0


class StoppedWhilePreprocessing:
    """A Stop that lands while the request's images are decoded: its abort reaches the engine
    loop before the request does, and the loop ignores it."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.control = ReplyControl(self)

    def stream_outputs(self, conversation, params, limits=None, request_id=None):
        self.control.stop()
        return self.loop.stream_outputs(conversation, params, limits, request_id)

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)


def test_a_stop_lost_by_the_engine_ends_the_reply_at_its_first_output(
    slow_loop: EngineLoop,
) -> None:
    backend = StoppedWhilePreprocessing(slow_loop)
    settings = ChatSettings(max_tokens=400)
    replies = list(stream_reply(backend, [], "hello", settings, control=backend.control))
    assert len(replies) == 1 and replies[0].finish_reason == "abort"
    wait_until(lambda: is_idle(slow_loop))
    assert slow_loop.engine.num_steps < 20


def test_replicas_still_loading_get_a_readable_reply(loop: EngineLoop) -> None:
    from app.launch import LeastBusyLoop

    loaded: list[EngineLoop] = []
    backend = LeastBusyLoop(lambda: loaded)
    (reply,) = stream_reply(backend, [], "hello")
    assert reply == Reply("⚠️ The model is still loading; send again in a moment.", True)
    loaded.append(loop)
    replies = list(stream_reply(backend, [], "hello", ChatSettings(max_tokens=MAX_TOKENS)))
    assert replies[-1].text == reference().generate(_text_only("hello"), GREEDY).text


class Busy:
    num_active = 3

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def stream_outputs(self, conversation, params, limits=None, request_id=None):
        raise AssertionError("the least busy loop should have been picked")

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_each_reply_goes_to_the_least_busy_loop(loop: EngineLoop) -> None:
    from app.launch import LeastBusyLoop

    backend = LeastBusyLoop(lambda: [Busy(), loop, Busy()])
    replies = list(stream_reply(backend, [], "hello", ChatSettings(max_tokens=MAX_TOKENS)))
    assert not replies[-1].is_error and replies[-1].finish_reason in ("stop", "length")


def test_a_stop_reaches_the_replica_that_has_the_reply(slow_loop: EngineLoop) -> None:
    from app.launch import LeastBusyLoop

    busy = Busy()
    backend = LeastBusyLoop(lambda: [busy, slow_loop])
    control = ReplyControl(backend)
    replies = stream_reply(backend, [], "hello", ChatSettings(max_tokens=400), control=control)
    next(replies)
    control.stop()
    assert list(replies)[-1].finish_reason == "abort"
    assert busy.aborted == [control.request_id]  # the other replica ignores the id
    wait_until(lambda: is_idle(slow_loop))


def _text_only(text: str) -> Conversation:
    conversation = Conversation()
    conversation.add_user(text)
    return conversation
