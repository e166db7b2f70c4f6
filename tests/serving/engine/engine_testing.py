"""Helpers for the engine tests: pristine tiny models, a mixed multi-image workload, an engine
driver that checks the streamed outputs, fake requests for scheduler unit tests."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from factories import (
    BLUE,
    GREEN,
    RED,
    YELLOW,
    make_conversation,
    make_image,
    make_model,
    make_tokenizer,
)

from serving.engine import Engine, EngineConfig
from serving.engine.request import Request
from serving.engine.scheduler import Scheduler, SchedulerOutput
from visualchat.api import VisualChat
from visualchat.detokenize import IncrementalDecoder
from visualchat.messages import Conversation
from visualchat.processor import ProcessedInputs
from visualchat.sampling import SamplingParams

# Seed 3 gives varied greedy output (few repeated tokens) under both attentions, so equal
# token streams say something.
MODEL_SEED = 3


@functools.lru_cache(maxsize=16)
def _pristine(attention: str, seed: int, arch: str, tie_word_embeddings: bool, image_indices: int):
    return make_model(
        attention=attention,
        seed=seed,
        arch=arch,
        tie_word_embeddings=tie_word_embeddings,
        image_indices=image_indices,
    )


def model_copy(
    attention: str = "mmca",
    seed: int = MODEL_SEED,
    arch: str = "llama",
    tie_word_embeddings: bool = False,
    image_indices: int = 0,
):
    """A private copy of a tiny model: the engine switches its copy to paged attention."""
    model, tokenizer = _pristine(attention, seed, arch, tie_word_embeddings, image_indices)
    return copy.deepcopy(model), tokenizer


def reference(attention: str = "mmca", seed: int = MODEL_SEED, **model_kwargs) -> VisualChat:
    """The reference decoder (VisualChat.generate) over its own copy of the same weights."""
    model, tokenizer = model_copy(attention, seed, **model_kwargs)
    return VisualChat(model, tokenizer)


def make_engine(
    attention: str = "mmca",
    seed: int = MODEL_SEED,
    arch: str = "llama",
    tie_word_embeddings: bool = False,
    image_indices: int = 0,
    **config,
) -> Engine:
    """An engine over a private model copy; small cache and budget unless given."""
    config.setdefault("block_size", 4)
    config.setdefault("num_blocks", 256)
    config.setdefault("max_num_batched_tokens", 64)
    model, tokenizer = model_copy(attention, seed, arch, tie_word_embeddings, image_indices)
    return Engine(model, tokenizer, EngineConfig(**config))


IMAGES = [make_image(c) for c in (RED, GREEN, BLUE, YELLOW)]
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Compare the two images and describe the colors.",
    "héllo café 中文 🙂",
    "what is in the picture?",
    "thanks",
    "be brief please",
    "The dog sleeps in the sun. The first image is red, the second image is green.",
]


def workload(num_requests: int = 10) -> list[Conversation]:
    """Mixed prompts: 0-3 images each (shared across requests), text around and between them,
    every third a two-round conversation whose images arrive in the second user turn."""
    conversations = []
    for i in range(num_requests):
        images = [IMAGES[(i + j) % len(IMAGES)] for j in range(i % 4)]
        text = TEXTS[i % len(TEXTS)]
        if i % 3 == 2:
            later = [*images[:1], TEXTS[(i + 3) % len(TEXTS)], *images[1:]]
            conversation = make_conversation([text], "reply1 thanks", later)
        else:
            parts: list = list(images)
            parts.insert(len(images) // 2, text)
            conversation = make_conversation(parts, system="be brief" if i % 2 else None)
        conversations.append(conversation)
    return conversations


def num_distinct_images(conversations: list[Conversation]) -> int:
    return len({id(part.image) for c in conversations for part in c.images()})


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0


def run_engine(
    engine: Engine,
    prompts: list[tuple[Conversation | ProcessedInputs, SamplingParams]],
    max_steps: int = 20000,
) -> tuple[list[Result], list[Request]]:
    """Add every prompt, step to completion; check each streamed RequestOutput on the way."""
    ids = [engine.add_request(prompt, params) for prompt, params in prompts]
    requests = [engine.requests[i] for i in ids]
    results = {
        i: Result(num_prompt_tokens=r.num_prompt_tokens) for i, r in zip(ids, requests, strict=True)
    }
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            result = results[out.request_id]
            assert result.finish_reason is None, f"{out.request_id} streamed after finishing"
            assert len(out.new_token_ids) == 1
            result.text += out.delta
            result.token_ids += out.new_token_ids
            assert out.num_output_tokens == len(result.token_ids)
            assert out.num_prompt_tokens == result.num_prompt_tokens
            if out.finished:
                result.finish_reason = out.finish_reason
            else:
                assert out.finish_reason is None
    else:
        raise AssertionError(f"not finished after {max_steps} steps")
    return [results[i] for i in ids], requests


def give_biases_weight(model) -> list[torch.Tensor]:
    """The backbone's linear biases (Qwen2's q/k/v), drawn at random in place: transformers
    initialises them to zero, which would leave a forward that ignored them untested."""
    biases = [
        m.bias for m in model.language_model.modules() if getattr(m, "bias", None) is not None
    ]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for bias in biases:
            bias.normal_(std=0.5)
    return biases


def record_logits(engine: Engine) -> list[torch.Tensor]:
    """Every pass's logits, in order."""
    passes: list[torch.Tensor] = []
    execute = engine.runner.execute

    def recording(chunks):
        logits = execute(chunks)
        passes.append(logits.clone())
        return logits

    engine.runner.execute = recording
    return passes


def assert_cache_empty(engine: Engine) -> None:
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.requests == {}
    assert list(engine.scheduler.waiting) == []
    assert engine.scheduler.running == []
    assert not engine.has_unfinished_requests()
    assert engine.runner.mirror.num_bytes == 0  # no copies of finished sequences' keys


def record_plans(engine: Engine) -> list[list[tuple[Request, int, int]]]:
    """Record (request, start, num_tokens) of every scheduled chunk, step by step."""
    plans: list[list[tuple[Request, int, int]]] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        plans.append([(c.request, c.start, c.num_tokens) for c in out.chunks])
        return out

    engine.scheduler.schedule = recording
    return plans


# --- scheduler unit tests -------------------------------------------------------------------


def fake_request(request_id: str, num_prompt_tokens: int, max_tokens: int = 1000) -> Request:
    """A text-only request of num_prompt_tokens ids; nothing in it needs a model."""
    inputs = ProcessedInputs(
        input_ids=torch.arange(num_prompt_tokens, dtype=torch.long) % 50 + 3,
        token_modality=torch.zeros(num_prompt_tokens, dtype=torch.long),
        image_spans=[],
        pixel_values=None,
    )
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(
        request_id, inputs, params, IncrementalDecoder(make_tokenizer()), torch.Generator()
    )


def plan_of(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


def complete(scheduler: Scheduler, out: SchedulerOutput, capacity: int | None = None) -> None:
    """What the engine does after a pass: advance num_computed, 'sample' a token where a chunk
    reaches the end, finish requests at max_tokens (or when they fill the cache)."""
    sampling = [c for c in out.chunks if c.samples]
    for chunk in out.chunks:
        chunk.request.num_computed_tokens = chunk.start + chunk.num_tokens
    for chunk in sampling:
        request = chunk.request
        request.output_ids.append(7)
        full = capacity is not None and request.num_tokens >= capacity
        if len(request.output_ids) >= request.params.max_tokens or full:
            scheduler.finish(request)


WORKLOAD = workload(10)
GREEDY = SamplingParams(max_tokens=12)


@functools.lru_cache(maxsize=4)
def _reference_decoder(attention: str, seed: int) -> VisualChat:
    return reference(attention, seed)


@functools.lru_cache(maxsize=512)
def reference_output(
    index: int, params: SamplingParams, attention: str = "mmca", seed: int = MODEL_SEED
) -> Result:
    """VisualChat.generate on WORKLOAD[index], computed once per (index, params, model)."""
    out = _reference_decoder(attention, seed).generate(WORKLOAD[index], params)
    return Result(out.text, out.token_ids, out.finish_reason, out.num_prompt_tokens)
