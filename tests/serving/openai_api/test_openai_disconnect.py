"""A client that goes away aborts its engine request, which frees the request's KV blocks."""

from __future__ import annotations

import time

import httpx
import pytest
from openai_helpers import MODEL_NAME, wait_until_idle

# Long enough (the context is 512 tokens) that the request cannot finish by itself before the
# abort: the engine would need hundreds of steps.
LONG = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "Describe the picture in detail."}],
    "max_tokens": 480,
    "temperature": 0,
    "ignore_eos": True,
}


@pytest.fixture
def aborts(replica, monkeypatch) -> list[tuple[str, bool]]:
    """(request id, was it still running) for every abort the engine sees."""
    engine = replica.engine
    calls: list[tuple[str, bool]] = []
    real_abort = engine.abort

    def spy(request_id: str) -> bool:
        calls.append((request_id, real_abort(request_id)))
        return calls[-1][1]

    monkeypatch.setattr(engine, "abort", spy)
    return calls


def test_closing_a_stream_aborts_the_request_and_frees_its_blocks(http, replica, aborts) -> None:
    engine = replica.engine
    wait_until_idle(engine)
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 3:  # the role chunk and two content chunks
                    break
        assert engine.requests, "the request should still be running"
        assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    # Leaving the block closes the connection mid-stream.
    wait_until_idle(engine, timeout=10)
    [(request_id, was_running)] = aborts
    assert was_running, f"{request_id} had finished before the disconnect was noticed"


def test_a_client_that_times_out_before_the_reply_aborts_too(server, replica, aborts) -> None:
    engine = replica.engine
    wait_until_idle(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json=LONG,
            headers={"Authorization": "Bearer test-key"},
            timeout=httpx.Timeout(5, read=0.5),
        )
    # The client may give up before the server has handed the request to the engine (a busy
    # machine): the engine is idle then, and the abort comes once the request arrives.
    deadline = time.monotonic() + 10
    while not aborts and time.monotonic() < deadline:
        time.sleep(0.02)
    wait_until_idle(engine, timeout=10)
    [(request_id, was_running)] = aborts
    assert was_running, f"{request_id} had finished before the disconnect was noticed"


def test_the_server_serves_after_disconnects(client, replica) -> None:
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert response.usage.completion_tokens == 3
    wait_until_idle(replica.engine)
