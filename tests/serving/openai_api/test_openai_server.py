"""APIServer / serve(): listens at once, loads a checkpoint in the background, then answers;
a checkpoint that fails to load stops the server with an error."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from openai_helpers import ENGINE_CONFIG

from serving.openai_api import APIServer
from visualchat.messages import Conversation
from visualchat.model.loading import save_pretrained
from visualchat.sampling import SamplingParams


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Running:
    """APIServer.run() on a thread; the exception it raised, if any."""

    def __init__(self, server: APIServer) -> None:
        self.server = server
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def wait_for_health(base_url: str, timeout: float = 60) -> list[int]:
    """Status codes of /health until it is 200 (connection refused counts as not yet)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{base_url}/health", timeout=5).status_code
        except httpx.ConnectError:
            time.sleep(0.02)
            continue
        seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"/health never turned 200: {seen[-5:]}")


def test_server_loads_a_checkpoint_and_serves_two_replicas(tmp_path, tiny_model, reference) -> None:
    model, tokenizer = tiny_model
    save_pretrained(model, tokenizer, tmp_path / "tiny")
    port = free_port()
    server = APIServer(
        tmp_path / "tiny",
        port=port,
        api_key="k",
        replicas=2,
        engine_config=ENGINE_CONFIG,
        log_level="warning",
    )
    assert server.model_name == "tiny"
    running = Running(server)
    base_url = f"http://127.0.0.1:{port}"
    try:
        statuses = wait_for_health(base_url)
        assert set(statuses[:-1]) <= {503}
        assert len(server.loops) == 2
        messages = [{"role": "user", "content": "hello"}]
        response = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0},
            headers={"Authorization": "Bearer k"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        expected = reference.generate(
            Conversation.from_openai(messages), SamplingParams(max_tokens=5)
        )
        assert response.json()["choices"][0]["message"]["content"] == expected.text
    finally:
        running.stop()
    assert running.error is None
    assert all(not loop._thread.is_alive() for loop in server.loops)


def test_a_checkpoint_that_fails_to_load_stops_the_server(tmp_path) -> None:
    server = APIServer(tmp_path / "missing", port=free_port(), log_level="critical")
    running = Running(server)
    running.thread.join(timeout=30)
    assert not running.thread.is_alive()
    assert isinstance(running.error, RuntimeError)
    assert "loading the model failed" in str(running.error)
    assert "not a VisualChat checkpoint" in str(running.error)
    assert not server.is_ready
    assert "FileNotFoundError" in server.app.state.visualchat.load_error


def test_one_device_per_replica_is_checked() -> None:
    with pytest.raises(ValueError, match="2 devices given for 3 replicas"):
        APIServer(None, replicas=3, device=["cpu", "cpu"])
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        APIServer(None, replicas=0)
