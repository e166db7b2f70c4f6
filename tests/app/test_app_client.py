"""The launched web chat through gradio_client: `launch_ui` on a saved tiny checkpoint, two images
and two rounds in one client session, streamed replies equal to the reference decoder's, and a
cancelled reply that aborts its engine request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gradio_client  # noqa: E402  (a dependency: fail loudly if missing)
import httpx
import pytest
from app_testing import (
    ENGINE_CONFIG,
    free_port,
    image_files,
    is_growing,
    is_idle,
    slow_down,
    tiny_model,
    wait_until,
)

from app.launch import RunningUI, api_server_with_ui, launch_ui
from serving.engine import EngineConfig
from visualchat.api import VisualChat
from visualchat.messages import Conversation
from visualchat.model.loading import save_pretrained
from visualchat.sampling import SamplingParams

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(*tiny_model(), folder)
    return folder


@pytest.fixture(scope="module")
def running(checkpoint: Path) -> Iterator[RunningUI]:
    ui = launch_ui(
        checkpoint,
        host="127.0.0.1",
        port=free_port(),
        engine_config=EngineConfig(**ENGINE_CONFIG),
        block=False,
        quiet=True,
    )
    yield ui
    ui.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return image_files(tmp_path_factory.mktemp("images"))


def ask(client, text: str, files: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    """Submit to the /chat API and collect the streamed reply texts."""
    message = {"text": text, "files": [gradio_client.handle_file(f) for f in files]}
    job = client.submit(message, max_tokens, 0.0, 1.0, "", api_name="/chat")
    texts = list(job)
    assert job.result() == texts[-1]
    return texts


def test_two_images_two_rounds_streamed(
    running: RunningUI, checkpoint: Path, images: dict[str, str]
) -> None:
    client = gradio_client.Client(running.url, verbose=False)
    reference = VisualChat.from_pretrained(checkpoint)  # what launch_ui loaded, decoded slowly
    params = SamplingParams(max_tokens=MAX_TOKENS)

    first = ask(client, "Compare the two images.", [images["red"], images["green"]])
    conversation = Conversation()
    conversation.add_user("Compare the two images.", images=[images["red"], images["green"]])
    expected_first = reference.generate(conversation, params).text
    assert expected_first and first[-1] == expected_first
    assert len(first) > 1 and is_growing(first)

    second = ask(client, "What colour is image 2?", [])  # same session: the history is kept
    conversation.add_assistant(expected_first)
    conversation.add_user("What colour is image 2?")
    assert second[-1] == reference.generate(conversation, params).text
    assert is_growing(second)

    # a second client is a second session with its own, empty history
    other = ask(gradio_client.Client(running.url, verbose=False), "What colour is image 2?", [])
    alone = Conversation()
    alone.add_user("What colour is image 2?")
    assert other[-1] == reference.generate(alone, params).text
    wait_until(lambda: is_idle(running.loop))


def test_bad_image_gets_a_readable_reply(running: RunningUI, tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png")
    client = gradio_client.Client(running.url, verbose=False)
    (reply,) = ask(client, "What is this?", [str(fake)])
    assert reply.startswith("⚠️ Image 1 (fake.png): not an image"), reply


def test_cancel_aborts_the_engine_request(running: RunningUI, images: dict[str, str]) -> None:
    engine = running.loop.engine
    restore = slow_down(engine, step_delay=0.02, ignore_eos=True)
    try:
        client = gradio_client.Client(running.url, verbose=False)
        message = {
            "text": "Describe it at length.",
            "files": [gradio_client.handle_file(images["blue"])],
        }
        job = client.submit(message, 400, 0.0, 1.0, "", api_name="/chat")
        wait_until(lambda: len(job.outputs()) >= 2)
        (request,) = engine.requests.values()
        job.cancel()
        wait_until(lambda: is_idle(running.loop))
        assert request.finish_reason == "abort" and request.block_table == []
        assert len(request.output_ids) < 400
    finally:
        restore()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


def test_serve_with_ui_puts_the_chat_beside_the_api(
    checkpoint: Path, images: dict[str, str]
) -> None:
    """`visualchat serve --ui --api-key KEY`: one server, the API at /v1, the chat at /ui behind
    the same key, answering from the replicas that the server loads after it starts."""
    port = free_port()
    server = api_server_with_ui(
        checkpoint,
        host="127.0.0.1",
        port=port,
        api_key="secret",
        engine_config=EngineConfig(**ENGINE_CONFIG),
        log_level="warning",
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(f"{base}/health") == 200)
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer secret"})
        assert models.status_code == 200
        assert _status(f"{base}/ui/gradio_api/info") == 401  # the chat wants the key too
        client = gradio_client.Client(f"{base}/ui/", auth=("anyone", "secret"), verbose=False)
        texts = ask(client, "Compare the two images.", [images["red"], images["blue"]])
        client.close()  # stops its heartbeat thread
        conversation = Conversation()
        conversation.add_user("Compare the two images.", images=[images["red"], images["blue"]])
        reference = VisualChat.from_pretrained(checkpoint)
        expected = reference.generate(conversation, SamplingParams(max_tokens=MAX_TOKENS)).text
        assert texts[-1] == expected
        (loop,) = server.loops
        wait_until(lambda: is_idle(loop))
    finally:
        server.stop()
        thread.join(timeout=30)


def test_sessions_are_answered_together(running: RunningUI, checkpoint: Path) -> None:
    """No queue of one: replies of several sessions run in the engine at the same time."""
    engine = running.loop.engine
    restore = slow_down(engine, step_delay=0.02)
    questions = [f"Question {i}: what is in the picture?" for i in range(6)]
    try:
        clients = [gradio_client.Client(running.url, verbose=False) for _ in questions]
        jobs = [
            client.submit({"text": q, "files": []}, MAX_TOKENS, 0.0, 1.0, "", api_name="/chat")
            for client, q in zip(clients, questions, strict=True)
        ]
        most_at_once = 0
        while not all(job.done() for job in jobs):
            most_at_once = max(most_at_once, len(engine.requests))
            time.sleep(0.005)
        replies = [job.result() for job in jobs]
    finally:
        restore()
    assert most_at_once >= 3
    reference = VisualChat.from_pretrained(checkpoint)
    for question, reply in zip(questions, replies, strict=True):
        conversation = Conversation()
        conversation.add_user(question)
        assert reply == reference.generate(conversation, SamplingParams(max_tokens=MAX_TOKENS)).text
