"""Many concurrent streamed requests: each gets the text it gets alone (also when a small
cache forces preemption), and the cache ends empty; preprocessing never blocks other clients."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from factories import BLUE, RED, make_image
from openai_helpers import (
    API_KEY,
    MODEL_NAME,
    ServerThread,
    image_part,
    text_part,
    wait_until_idle,
)

from serving.engine import Engine, EngineConfig, EngineLoop
from serving.openai_api import create_app

NUM_REQUESTS = 120  # more than max_num_seqs (64): some wait for a running slot
PROMPTS = [  # distinct greedy replies, so a mixed-up stream would show
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "The quick brown fox"}],
    [{"role": "user", "content": [image_part(make_image(BLUE)), text_part("describe the colors")]}],
    [
        {
            "role": "user",
            "content": [
                image_part(make_image(RED)),
                image_part(make_image(BLUE)),
                text_part("Compare the two images."),
            ],
        }
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Be brief please"},
        {"role": "assistant", "content": "reply1"},
        {"role": "user", "content": "and now?"},
    ],
]
MAX_TOKENS = 8


async def stream_text(client: openai.AsyncOpenAI, messages: list[dict]) -> tuple[str, str]:
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    parts, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


def solo_outputs(client: openai.OpenAI) -> list[tuple[str, str]]:
    alone = [
        client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        for messages in PROMPTS
    ]
    expected = [(r.choices[0].message.content, r.choices[0].finish_reason) for r in alone]
    assert len({text for text, _ in expected}) == len(PROMPTS), "prompts must differ in output"
    return expected


def concurrent_outputs(base_url: str, api_key: str, num_requests: int) -> list[tuple[str, str]]:
    async def run_all() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60
        ) as aclient:
            return await asyncio.gather(
                *(stream_text(aclient, PROMPTS[i % len(PROMPTS)]) for i in range(num_requests))
            )

    return asyncio.run(run_all())


def test_concurrent_streams_match_solo_outputs_and_free_the_cache(server, client, replica) -> None:
    expected = solo_outputs(client)
    started = time.monotonic()
    results = concurrent_outputs(server.base_url, API_KEY, NUM_REQUESTS)
    elapsed = time.monotonic() - started
    for i, result in enumerate(results):
        assert result == expected[i % len(PROMPTS)], f"request {i}"
    wait_until_idle(replica.engine)
    assert elapsed < 60


def test_streams_survive_preemption_in_a_small_cache(tiny_model, caplog) -> None:
    """12 blocks of 8 tokens hold two or three of these prompts: running requests get
    preempted and recomputed, and every stream still gets its solo text."""
    model, tokenizer = tiny_model
    config = EngineConfig(max_num_batched_tokens=64, num_blocks=12, block_size=8)
    engine = Engine(copy.deepcopy(model), tokenizer, config)
    loop = EngineLoop(engine)
    try:
        with ServerThread(create_app(loop, MODEL_NAME)) as running:
            client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="-", max_retries=0)
            expected = solo_outputs(client)
            with caplog.at_level(logging.INFO, logger="serving.engine.scheduler"):
                results = concurrent_outputs(running.base_url, "-", 40)
            for i, result in enumerate(results):
                assert result == expected[i % len(PROMPTS)], f"request {i}"
            assert "preempting" in caplog.text
            wait_until_idle(engine)
    finally:
        loop.shutdown()


def test_preprocessing_runs_off_the_event_loop(server, replica, monkeypatch) -> None:
    """A request stuck in image decoding / tokenization must not stall other clients."""
    real_process = replica.engine.process
    entered, release = threading.Event(), threading.Event()

    def slow_process(conversation, limits=None):
        if conversation.messages[-1].text == "slow":
            entered.set()
            release.wait(timeout=20)
        return real_process(conversation, limits)

    monkeypatch.setattr(replica.engine, "process", slow_process)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def post(text: str) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 2}
        return httpx.post(
            f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=5
        )

    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(post, "slow")
        assert entered.wait(timeout=10)
        try:
            fast = post("fast")
            assert fast.status_code == 200, fast.text
        finally:
            release.set()
        assert slow.result().status_code == 200
    wait_until_idle(replica.engine)
