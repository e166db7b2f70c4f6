"""Chat completions through a real server and the official openai client: plain, streamed,
several images, several rounds, equal to the reference decoder; /v1/models."""

from __future__ import annotations

import json

import pytest
from factories import BLUE, GREEN, RED, YELLOW, make_image
from openai_helpers import MODEL_NAME, image_part, text_part, wait_until_idle

from visualchat.messages import Conversation
from visualchat.sampling import SamplingParams

MULTI_IMAGE = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [
            image_part(make_image(RED)),
            image_part(make_image(GREEN)),
            text_part("Compare the two images."),
        ],
    },
]
MULTI_ROUND = [
    *MULTI_IMAGE,
    {"role": "assistant", "content": "The first image is red."},
    {"role": "user", "content": [text_part("And this one?"), image_part(make_image(BLUE))]},
]


def reference_text(reference, messages: list[dict], max_tokens: int) -> str:
    conversation = Conversation.from_openai(messages)
    return reference.generate(conversation, SamplingParams(max_tokens=max_tokens)).text


def test_plain_completion(client, replica) -> None:
    response = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
    )
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == MODEL_NAME
    [choice] = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    prompt_tokens = replica.engine.process(
        Conversation.from_openai([{"role": "user", "content": "hello"}])
    ).num_tokens
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == prompt_tokens + 6
    wait_until_idle(replica.engine)


@pytest.mark.parametrize("messages", [MULTI_IMAGE, MULTI_ROUND], ids=["images", "rounds"])
def test_greedy_output_equals_the_reference_decoder(client, reference, messages) -> None:
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0
    )
    assert response.choices[0].message.content == reference_text(reference, messages, 12)
    assert (
        response.usage.prompt_tokens
        == reference.process(Conversation.from_openai(messages)).num_tokens
    )


def test_streamed_deltas_concatenate_to_the_non_streamed_text(client, reference) -> None:
    expected = reference_text(reference, MULTI_ROUND, 10)
    plain = client.chat.completions.create(
        model=MODEL_NAME, messages=MULTI_ROUND, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MULTI_ROUND,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert plain.choices[0].message.content == expected
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, final, usage = chunks
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == expected
    assert all(c.choices[0].finish_reason is None for c in content_chunks)
    assert final.choices[0].finish_reason == "length"
    assert final.choices[0].delta.content is None
    assert usage.choices == []
    assert usage.usage.model_dump() == plain.usage.model_dump()


def test_stream_without_usage_ends_with_the_finish_chunk_and_done(http) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert all("usage" not in c for c in chunks)


def test_stop_string_and_eos_finish_with_stop(client, reference) -> None:
    messages = [{"role": "user", "content": "hello"}]
    full = reference_text(reference, messages, 12)
    cut = full[3:5]
    assert cut and cut in full
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0, stop=[cut]
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == full[: full.index(cut)]


def test_seeded_sampling_is_reproducible(client) -> None:
    def sample() -> str:
        response = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            temperature=1.5,
            top_p=0.9,
            seed=1234,
            extra_body={"top_k": 50},
        )
        return response.choices[0].message.content

    assert sample() == sample()


def test_ignore_eos_always_generates_max_tokens(client) -> None:
    messages = [{"role": "user", "content": [image_part(make_image(YELLOW)), text_part("hi")]}]
    response = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_completion_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.usage.completion_tokens == 20
    assert response.choices[0].finish_reason == "length"


def test_models_lists_the_served_model(client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"
