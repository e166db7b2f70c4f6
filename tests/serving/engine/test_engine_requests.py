"""Engine requests: seeded sampling, stop strings and finish reasons, abort, the image feature
cache, prompts over the context or the cache, and budget auto-selection."""

from __future__ import annotations

import math

import pytest
import torch
from engine_testing import (
    GREEDY,
    IMAGES,
    WORKLOAD,
    assert_cache_empty,
    make_engine,
    reference,
    reference_output,
    run_engine,
)
from factories import GREEN, RED, make_conversation, make_image

from serving.engine import EngineConfig
from serving.engine.engine import Engine
from serving.engine.request import RequestStatus
from serving.engine.runner import ModelRunner
from visualchat.api import VisualChat
from visualchat.model.generate import generate
from visualchat.processor import ContextLengthError, ProcessedInputs
from visualchat.sampling import SamplingParams

SEEDED = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)

# --- seeded sampling -------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch() -> None:
    target = WORKLOAD[4]
    alone, _ = run_engine(make_engine(max_num_batched_tokens=64), [(target, SEEDED)])
    again, _ = run_engine(make_engine(max_num_batched_tokens=512), [(target, SEEDED)])
    crowd = [
        (c, SamplingParams(max_tokens=16, temperature=1.0, seed=None if i % 2 else i))
        for i, c in enumerate(WORKLOAD[:6])
    ]
    crowd.insert(3, (target, SEEDED))
    crowded, requests = run_engine(make_engine(max_num_batched_tokens=24), crowd)
    assert alone[0].token_ids == again[0].token_ids == crowded[3].token_ids
    assert alone[0] == crowded[3]
    # the reference decoder seeds its own generator the same way
    assert alone[0] == reference_output(4, SEEDED)
    # the stream is random: another seed, or greedy decoding, gives other tokens
    other, _ = run_engine(
        make_engine(), [(target, SamplingParams(**{**vars(SEEDED), "seed": 4321}))]
    )
    assert other[0].token_ids != alone[0].token_ids
    assert reference_output(4, SamplingParams(max_tokens=16)).token_ids != alone[0].token_ids
    assert len(set(alone[0].token_ids)) >= 8
    assert {r.generator is requests[3].generator for r in requests} == {True, False}


# --- stop strings, max_tokens, eos --------------------------------------------------------------

# Seed 4 ends these replies with eos after 17 and 13 tokens.
STORY = make_conversation([IMAGES[0], "The dog sleeps in the sun."])
BRIEF = make_conversation([IMAGES[0], "be brief please"])


def test_stop_strings_max_tokens_and_eos_match_the_reference_decoder() -> None:
    vc = reference(seed=4)
    full = vc.generate(STORY, SamplingParams(max_tokens=30, ignore_eos=True)).text
    cases = [
        (BRIEF, SamplingParams(max_tokens=30), "stop"),  # eos
        (BRIEF, SamplingParams(max_tokens=5), "length"),
        (BRIEF, SamplingParams(max_tokens=1), "length"),
        (BRIEF, SamplingParams(max_tokens=20, ignore_eos=True), "length"),  # runs past eos
        (STORY, SamplingParams(max_tokens=30, stop=" d"), "stop"),
        (STORY, SamplingParams(max_tokens=30, stop=("never-there", " the")), "stop"),
        (STORY, SamplingParams(max_tokens=30, ignore_eos=True, stop="never-there"), "length"),
        (STORY, SamplingParams(max_tokens=30, stop="1�1"), "stop"),
    ]
    engine = make_engine(seed=4, max_num_batched_tokens=13)
    results, _ = run_engine(engine, [(c, p) for c, p, _ in cases])
    for (conversation, params, reason), result in zip(cases, results, strict=True):
        expected = vc.generate(conversation, params)
        assert expected.finish_reason == reason, params  # the case tests what it says
        assert (result.text, result.token_ids, result.finish_reason) == (
            expected.text,
            expected.token_ids,
            expected.finish_reason,
        ), params
    assert_cache_empty(engine)
    eos = engine.tokenizer.eos_token_id
    assert results[0].token_ids[-1] == eos and len(results[0].token_ids) == 13
    assert len(results[1].token_ids) == 5 and len(results[2].token_ids) == 1
    assert eos in results[3].token_ids[:-1] and len(results[3].token_ids) == 20
    assert results[4].text == full[: full.index(" d")]
    assert results[5].text == full[: full.index(" the")]
    assert results[6].text == full


# --- abort ---------------------------------------------------------------------------------------


def test_abort_of_an_unknown_or_finished_request_returns_false() -> None:
    engine = make_engine()
    assert engine.abort("nope") is False
    results, requests = run_engine(engine, [(WORKLOAD[0], SamplingParams(max_tokens=2))])
    assert engine.abort(requests[0].request_id) is False
    assert requests[0].finish_reason == "length"


def test_abort_mid_prefill_frees_the_whole_reservation_at_once() -> None:
    engine = make_engine(max_num_batched_tokens=7)
    long_id = engine.add_request(WORKLOAD[2], GREEDY)
    short_id = engine.add_request(WORKLOAD[0], GREEDY)
    long, short = engine.requests[long_id], engine.requests[short_id]
    assert engine.step() == []
    assert long.is_prefill and long.num_computed_tokens == 7
    assert len(long.block_table) == math.ceil(long.num_prompt_tokens / 4)  # all reserved
    assert short.status is RequestStatus.WAITING
    assert engine.blocks.num_used_blocks == len(long.block_table)

    assert engine.abort(long_id) is True
    assert long.block_table == [] and engine.blocks.num_used_blocks == 0
    assert long.status is RequestStatus.FINISHED and long.finish_reason == "abort"
    assert long_id not in engine.requests and long not in engine.scheduler.running
    assert engine.abort(long_id) is False

    text, ids = "", []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == short_id
            text, ids = text + out.delta, ids + out.new_token_ids
    assert (text, ids) == (reference_output(0, GREEDY).text, reference_output(0, GREEDY).token_ids)
    assert_cache_empty(engine)


def test_abort_mid_decode_frees_blocks_and_the_others_carry_on() -> None:
    engine = make_engine(max_num_batched_tokens=64)
    ids = [engine.add_request(WORKLOAD[i], GREEDY) for i in (1, 3)]
    victim, survivor = (engine.requests[i] for i in ids)
    while len(victim.output_ids) < 3:
        engine.step()
    assert not victim.is_finished and not victim.is_prefill
    assert engine.abort(ids[0]) is True
    assert victim.block_table == [] and victim.finish_reason == "abort"
    assert engine.blocks.num_used_blocks == len(survivor.block_table) > 0
    assert engine.scheduler.running == [survivor]
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == ids[1]
    assert survivor.output_ids == reference_output(3, GREEDY).token_ids
    assert engine.abort(ids[1]) is False
    assert_cache_empty(engine)


def test_aborting_the_last_decoding_request_drops_the_mirror_at_once() -> None:
    """An engine loop steps no idle engine, so the abort itself lets the copies go."""
    engine = make_engine(native_attention=False)  # else nothing would go through the mirror
    request_id = engine.add_request(WORKLOAD[1], GREEDY)
    while len(engine.requests[request_id].output_ids) < 3:
        engine.step()
    assert engine.runner.mirror.num_bytes > 0  # decoding through the mirror
    assert engine.abort(request_id) is True
    assert_cache_empty(engine)


def test_abort_of_a_waiting_request_takes_it_off_the_queue() -> None:
    engine = make_engine(max_num_seqs=1)
    first = engine.add_request(WORKLOAD[0], GREEDY)
    queued = engine.add_request(WORKLOAD[1], GREEDY)
    engine.step()
    assert [r.request_id for r in engine.scheduler.waiting] == [queued]
    assert engine.abort(queued) is True
    assert not engine.scheduler.waiting and engine.requests.keys() == {first}
    while engine.has_unfinished_requests():
        engine.step()
    assert_cache_empty(engine)


def test_closing_engine_stream_early_aborts_the_request() -> None:
    engine = make_engine(max_num_batched_tokens=13)
    stream = engine.stream(WORKLOAD[3], SamplingParams(max_tokens=50, ignore_eos=True))
    first = next(stream)
    assert first and engine.blocks.num_used_blocks > 0
    stream.close()
    assert_cache_empty(engine)


@pytest.mark.parametrize("attention", ["mmca", "causal"])
def test_closing_the_engine_aborts_what_is_left_and_gives_the_model_its_attention_back(
    attention: str,
) -> None:
    with make_engine(attention) as engine:
        model = engine.model
        implementation = model.language_model.config._attn_implementation
        engine.add_request(WORKLOAD[0], GREEDY)
        engine.step()
        assert engine.blocks.num_used_blocks > 0
    assert_cache_empty(engine)
    assert model.config.attention == attention
    assert model.language_model.config._attn_implementation != implementation
    # Outside the engine the model decodes exactly as the reference decoder does.
    ours = VisualChat(model, engine.tokenizer).generate(WORKLOAD[0], GREEDY).token_ids
    assert ours == reference(attention).generate(WORKLOAD[0], GREEDY).token_ids


def test_request_ids_are_unique() -> None:
    engine = make_engine()
    engine.add_request(WORKLOAD[0], GREEDY, request_id="mine")
    with pytest.raises(ValueError, match="'mine' is already in use"):
        engine.add_request(WORKLOAD[1], GREEDY, request_id="mine")
    assert engine.requests.keys() == {"mine"} and len(engine.scheduler.waiting) == 1


# --- image features -----------------------------------------------------------------------------


def test_image_features_are_computed_once_per_distinct_image() -> None:
    engine = make_engine(max_num_batched_tokens=7)  # 16-token images span several passes
    encoded: list[int] = []
    encode = engine.model.encode_images

    def counting(pixel_values: torch.Tensor) -> torch.Tensor:
        encoded.append(pixel_values.shape[0])
        return encode(pixel_values)

    engine.model.encode_images = counting
    red, green, blue = IMAGES[0], IMAGES[1], IMAGES[2]
    conversations = [
        make_conversation([red, green, "compare"]),
        make_conversation(["hi"], "hello", [red, "again"], "ok", [blue, "and this?"]),
        make_conversation([make_image(GREEN), "same pixels, new object", make_image(RED)]),
        make_conversation([blue, blue, "twice in one prompt"]),
    ]
    results, requests = run_engine(engine, [(c, GREEDY) for c in conversations])
    assert engine.image_cache.num_encoded == 3
    assert sum(encoded) == 3
    vc = reference()
    for conversation, result in zip(conversations, results, strict=True):
        expected = vc.generate(conversation, GREEDY)
        assert (result.text, result.token_ids) == (expected.text, expected.token_ids)
    # a later round of a conversation re-sends its images: nothing new to encode
    follow_up = conversations[1].copy()
    follow_up.add_assistant(results[1].text)
    follow_up.add_user("and the first one?")
    run_engine(engine, [(follow_up, GREEDY)])
    assert engine.image_cache.num_encoded == 3 and sum(encoded) == 3
    assert_cache_empty(engine)


# --- prompts that do not fit ---------------------------------------------------------------------


def text_inputs(num_tokens: int) -> ProcessedInputs:
    return ProcessedInputs(
        input_ids=torch.arange(num_tokens, dtype=torch.long) % 200 + 3,
        token_modality=torch.zeros(num_tokens, dtype=torch.long),
        image_spans=[],
        pixel_values=None,
    )


def test_a_prompt_over_the_cache_is_refused_and_the_engine_keeps_working() -> None:
    engine = make_engine(num_blocks=10, max_num_batched_tokens=13)  # 40 positions
    with pytest.raises(ContextLengthError, match=r"40 tokens but at most 39 fit.*cache 40"):
        engine.add_request(text_inputs(40), GREEDY)
    three_images = make_conversation([IMAGES[0], IMAGES[1], IMAGES[2], "too many"])
    with pytest.raises(ContextLengthError):
        engine.add_request(three_images, GREEDY)
    assert engine.requests == {} and not engine.scheduler.waiting
    assert engine.blocks.num_used_blocks == 0
    # the largest prompt that fits: its first token fills the cache, so it ends there
    results, _ = run_engine(engine, [(text_inputs(39), GREEDY)])
    assert len(results[0].token_ids) == 1 and results[0].finish_reason == "length"
    results, _ = run_engine(engine, [(WORKLOAD[0], GREEDY)])
    assert results[0] == reference_output(0, GREEDY)
    assert_cache_empty(engine)


def test_a_prompt_over_the_model_context_is_refused() -> None:
    engine = make_engine(num_blocks=256, max_num_batched_tokens=512)  # 1024 positions
    assert engine.context_length == 512
    with pytest.raises(ContextLengthError, match="model context 512"):
        engine.add_request(text_inputs(512), GREEDY)
    results, _ = run_engine(engine, [(text_inputs(511), GREEDY)])
    vc = reference()
    expected = generate(vc.model, vc.tokenizer, text_inputs(511), GREEDY)
    assert results[0].token_ids == expected.token_ids
    assert results[0].finish_reason == expected.finish_reason == "length"
    assert len(expected.token_ids) == 1
    assert_cache_empty(engine)


# --- budget auto-selection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"target_step_ms": 1e9}, 256),  # 512 is not below the 512-token context
        ({"target_step_ms": 1e9, "max_budget": 100}, 64),
        ({"target_step_ms": 1e9, "num_blocks": 20}, 64),  # 128 is not below the 80-slot cache
        ({"target_step_ms": 1e-6}, 32),  # even the smallest pass misses the target
        ({"target_step_ms": 1e-6, "min_budget": 48}, 48),
    ],
)
def test_the_budget_is_picked_from_the_latency_target(config: dict, expected: int) -> None:
    engine = make_engine(max_num_batched_tokens=None, **config)
    assert engine.budget == expected
    assert engine.scheduler.budget == expected
    assert_cache_empty(engine)  # the timing passes gave their blocks back
    results, _ = run_engine(engine, [(WORKLOAD[0], GREEDY)])
    assert results[0] == reference_output(0, GREEDY)


@pytest.mark.parametrize(
    ("probe_context", "num_blocks"),
    [(100, 256), (0, 256), (4096, 256), (4096, 20)],  # 512-token context; 1024 or 80 slots
)
def test_the_budget_is_timed_on_a_chunk_deep_in_a_prompt(
    monkeypatch: pytest.MonkeyPatch, probe_context: int, num_blocks: int
) -> None:
    """Each timed pass is one chunk after `probe_context` cached positions (capped so prefix
    plus chunk fit the context and the cache), as a long prompt's later chunks are."""
    timed: list[tuple[int, int, int]] = []  # (start, num_tokens, request length)
    execute = ModelRunner.execute

    def recording(self, chunks):
        timed.extend((c.start, c.num_tokens, c.request.num_tokens) for c in chunks)
        return execute(self, chunks)

    monkeypatch.setattr(ModelRunner, "execute", recording)
    engine = make_engine(
        max_num_batched_tokens=None,
        target_step_ms=1e9,
        probe_context=probe_context,
        num_blocks=num_blocks,
    )
    capacity = num_blocks * 4
    assert timed and {n for _, n, _ in timed} == {
        b for b in (32, 64, 128, 256) if b < min(512, capacity)
    }
    for start, num_tokens, length in timed:
        assert start == min(probe_context, 512 - num_tokens, capacity - num_tokens)
        assert length == start + num_tokens  # the chunk ends the probe prompt: it samples
    assert_cache_empty(engine)
    with pytest.raises(ValueError, match="probe_context must be non-negative"):
        EngineConfig(probe_context=-1)


def test_an_explicit_budget_is_used_as_given() -> None:
    vc = reference()
    engine = Engine(vc.model, vc.tokenizer, EngineConfig(max_num_batched_tokens=7, num_blocks=8))
    assert engine.budget == 7 and engine.scheduler.budget == 7
    assert (engine.blocks.num_blocks, engine.blocks.block_size) == (8, 16)
