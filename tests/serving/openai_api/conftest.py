"""Fixtures: a tiny random model, its engine loop and a real uvicorn server around it."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import openai
import pytest
from factories import make_model
from openai_helpers import (
    API_KEY,
    LIMITS,
    MAX_REQUEST_BYTES,
    MODEL_NAME,
    Replica,
    ServerThread,
    make_replica,
)

from serving.openai_api import create_app
from visualchat.api import VisualChat


@pytest.fixture(scope="session")
def tiny_model():
    return make_model()


@pytest.fixture(scope="session")
def reference(tiny_model) -> VisualChat:
    """The reference decoder on its own copy of the served weights."""
    model, tokenizer = tiny_model
    return VisualChat(copy.deepcopy(model), tokenizer)


@pytest.fixture(scope="session")
def replica(tiny_model) -> Iterator[Replica]:
    replica = make_replica(*tiny_model)
    yield replica
    replica.loop.shutdown()


@pytest.fixture(scope="session")
def server(replica) -> Iterator[ServerThread]:
    app = create_app(
        replica.loop,
        MODEL_NAME,
        api_key=API_KEY,
        limits=LIMITS,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    with ServerThread(app) as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    ) as http_client:
        yield http_client
