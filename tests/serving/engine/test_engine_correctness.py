"""The key property: the engine's output equals the reference decoder's token for token, for
many concurrent multi-image multi-round requests, at any budget, with MMCA and causal
attention, with and without chunked prefill, and under cache pressure that forces preemption."""

from __future__ import annotations

import copy

import pytest
from block_formats import make_gguf_like
from engine_testing import (
    GREEDY,
    WORKLOAD,
    assert_cache_empty,
    make_engine,
    model_copy,
    record_plans,
    reference,
    reference_output,
    run_engine,
)

from serving.engine import Engine, EngineConfig, block_kernels
from serving.engine.block_weights import BlockWeight
from serving.engine.decode_mirror import HEADROOM
from visualchat.api import VisualChat
from visualchat.sampling import SamplingParams


def splits_an_image_span(plans) -> bool:
    """Some chunk starts strictly inside an image span (the span was cut between passes)."""
    return any(
        span.start < start < span.start + span.length
        for plan in plans
        for request, start, _ in plan
        for span in request.inputs.image_spans
    )


def test_the_workload_is_mixed_and_mmca_changes_its_replies() -> None:
    """Preconditions that give the comparisons below their teeth."""
    num_images = [len(c.images()) for c in WORKLOAD]
    assert sorted(set(num_images)) == [0, 1, 2, 3]
    user_turns = [[m for m in c.messages if m.role == "user"] for c in WORKLOAD]
    assert sum(any(m.images for m in turns[1:]) for turns in user_turns) >= 2
    mmca = [reference_output(i, GREEDY, "mmca").token_ids for i in range(len(WORKLOAD))]
    causal = [reference_output(i, GREEDY, "causal").token_ids for i in range(len(WORKLOAD))]
    with_images = [i for i, n in enumerate(num_images) if n]
    text_only = [i for i, n in enumerate(num_images) if not n]
    # With images the two attentions disagree (an engine that ignored the tags would fail) ...
    assert all(mmca[i] != causal[i] for i in with_images)
    # ... and without images MMCA is exactly causal attention.
    assert all(mmca[i] == causal[i] for i in text_only)
    # Replies vary: equal streams are not equal by accident.
    assert all(len(set(mmca[i])) >= 3 for i in range(len(WORKLOAD)))


@pytest.mark.parametrize(
    ("chunked_prefill", "budget"), [(True, 7), (True, 13), (True, 512), (False, 7), (False, 512)]
)
@pytest.mark.parametrize("attention", ["mmca", "causal"])
def test_greedy_engine_output_equals_the_reference_decoder(
    attention: str, chunked_prefill: bool, budget: int
) -> None:
    engine = make_engine(attention, max_num_batched_tokens=budget, chunked_prefill=chunked_prefill)
    plans = record_plans(engine)
    results, requests = run_engine(engine, [(c, GREEDY) for c in WORKLOAD])
    for i, result in enumerate(results):
        assert result == reference_output(i, GREEDY, attention), f"request {i}"
    assert_cache_empty(engine)
    assert engine.image_cache.num_encoded == 4
    # Decode groups read their keys straight from the slots (native attention) where the
    # native library builds, else from the mirror, appended to step by step; either way the
    # runner holds no copies once nothing decodes.
    mirror = engine.runner.mirror
    if engine.runner.native_attention:
        assert mirror.num_appends == mirror.num_gathers == 0
    else:
        assert mirror.num_appends > mirror.num_gathers > 0
    assert mirror.num_bytes == 0
    prompt_chunks = [
        (start, num, request.num_prompt_tokens)
        for plan in plans
        for request, start, num in plan
        if start < request.num_prompt_tokens
    ]
    if chunked_prefill:
        assert all(sum(n for _, _, n in plan) <= budget for plan in plans)
        if budget < 16:  # an image is 16 tokens: its span is cut between passes
            assert splits_an_image_span(plans)
    else:
        assert all(start == 0 and num == length for start, num, length in prompt_chunks)
    if budget == 512:  # the first pass takes as many whole prompts as fit, then splits one
        lengths = [r.num_prompt_tokens for r in requests]
        fitting = next(n for n in range(len(lengths)) if sum(lengths[: n + 1]) > 512)
        first = [(r.request_id, start, num) for r, start, num in plans[0]]
        expected = [(r.request_id, 0, r.num_prompt_tokens) for r in requests[:fitting]]
        assert first[:fitting] == expected
        if chunked_prefill:
            assert first[fitting:] == [
                (requests[fitting].request_id, 0, 512 - sum(lengths[:fitting]))
            ]
        else:
            assert len(first) == fitting


@pytest.mark.parametrize("mirror_tokens", [0, 300])
def test_decode_groups_gathered_every_step_or_now_and_then_still_match(
    mirror_tokens: int,
) -> None:
    """0: no mirror, every decode group gathered from the slots in every layer; 300: the
    mirror takes the group while it is small and lets it go when it grows past the limit."""
    engine = make_engine(
        "mmca",
        max_num_batched_tokens=13,
        decode_mirror_tokens=mirror_tokens,
        native_attention=False,  # which would leave the mirror nothing to do
    )
    sizes = []  # (positions the mirror would hold, whether it holds them) per decode pass
    plan = engine.runner.mirror.plan

    def recording_plan(members, key_slots):
        taken = plan(members, key_slots)
        sizes.append((len(members) * (max(len(s) for s in key_slots) + HEADROOM), taken))
        return taken

    engine.runner.mirror.plan = recording_plan
    results, _ = run_engine(engine, [(c, GREEDY) for c in WORKLOAD])
    for i, result in enumerate(results):
        assert result == reference_output(i, GREEDY)
    assert all(taken == (size <= mirror_tokens) for size, taken in sizes)
    if mirror_tokens:
        assert {taken for _, taken in sizes} == {True, False}
    assert_cache_empty(engine)


def test_a_budget_of_one_token_still_matches() -> None:
    engine = make_engine("mmca", max_num_batched_tokens=1)
    indices = [0, 1]
    plans = record_plans(engine)
    results, _ = run_engine(engine, [(WORKLOAD[i], GREEDY) for i in indices])
    for i, result in zip(indices, results, strict=True):
        assert result == reference_output(i, GREEDY)
    assert all(len(plan) == 1 and plan[0][2] == 1 for plan in plans)
    assert splits_an_image_span(plans)
    assert_cache_empty(engine)


def test_few_running_sequences_at_a_time_still_match() -> None:
    engine = make_engine("mmca", max_num_batched_tokens=13, max_num_seqs=3)
    plans = record_plans(engine)
    results, _ = run_engine(engine, [(c, GREEDY) for c in WORKLOAD])
    for i, result in enumerate(results):
        assert result == reference_output(i, GREEDY)
    assert max(len({id(r) for r, _, _ in plan}) for plan in plans) == 3
    assert_cache_empty(engine)


@pytest.mark.parametrize(
    ("arch", "tie_word_embeddings"), [("qwen2", True), ("mistral", False), ("phi3", False)]
)
def test_other_backbones_match(arch: str, tie_word_embeddings: bool) -> None:
    """Attention biases (Qwen2), fused projections (Phi-3), tied embeddings: same rule."""
    engine = make_engine(
        arch=arch, tie_word_embeddings=tie_word_embeddings, max_num_batched_tokens=13
    )
    indices = [0, 1, 5]
    results, _ = run_engine(engine, [(WORKLOAD[i], GREEDY) for i in indices])
    vc = reference(arch=arch, tie_word_embeddings=tie_word_embeddings)
    for i, result in zip(indices, results, strict=True):
        expected = vc.generate(WORKLOAD[i], GREEDY)
        assert (result.text, result.token_ids, result.finish_reason) == (
            expected.text,
            expected.token_ids,
            expected.finish_reason,
        )
    assert_cache_empty(engine)


@pytest.mark.parametrize("attention", ["mmca", "causal"])
def test_image_number_vectors_match_with_features_reused_under_other_numbers(
    attention: str,
) -> None:
    """The image-number vector is added where a token is placed, not baked into the cached
    features: the workload shows the same image as Image 1 in one request and Image 3 in
    another. Two vectors for up to three images: Image 3 shares the last one."""
    engine = make_engine(attention, image_indices=2, max_num_batched_tokens=13)
    with_images = [i for i, c in enumerate(WORKLOAD) if c.images()]
    results, _ = run_engine(engine, [(WORKLOAD[i], GREEDY) for i in with_images])
    vc = reference(attention, image_indices=2)
    for i, result in zip(with_images, results, strict=True):
        expected = vc.generate(WORKLOAD[i], GREEDY)
        assert (result.token_ids, result.finish_reason) == (
            expected.token_ids,
            expected.finish_reason,
        ), f"request {i}"
    # The vectors change the replies, so matching them says something.
    assert any(
        vc.generate(WORKLOAD[i], GREEDY).token_ids
        != reference_output(i, GREEDY, attention).token_ids
        for i in with_images
    )
    assert engine.image_cache.num_encoded == 4
    assert_cache_empty(engine)


PRESSURE_PARAMS = [
    GREEDY,
    SamplingParams(max_tokens=20, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=1.0, seed=11),
    SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=5),
]


@pytest.mark.parametrize(
    ("budget", "chunked_prefill", "attention"),
    [(13, True, "mmca"), (512, True, "causal"), (64, False, "mmca")],
)
def test_output_matches_under_cache_pressure_that_forces_preemption(
    budget: int, chunked_prefill: bool, attention: str
) -> None:
    engine = make_engine(
        attention,
        max_num_batched_tokens=budget,
        chunked_prefill=chunked_prefill,
        num_blocks=40,  # 160 positions for ten requests of 30..110 tokens
    )
    prompts = [(c, PRESSURE_PARAMS[i % len(PRESSURE_PARAMS)]) for i, c in enumerate(WORKLOAD)]
    for i, (conversation, params) in enumerate(prompts):
        # precondition: every request fits the cache alone, so the cache never cuts a reply
        num_tokens = engine.process(conversation).num_tokens
        assert num_tokens + params.max_tokens < engine.capacity_tokens, i
    results, requests = run_engine(engine, prompts)
    for i, (result, (_, params)) in enumerate(zip(results, prompts, strict=True)):
        assert result == reference_output(i, params, attention), f"request {i}"
    assert sum(r.num_preemptions for r in requests) >= 1
    assert_cache_empty(engine)
    assert engine.image_cache.num_encoded == 4  # recomputation reuses the features


@pytest.mark.skipif(not block_kernels.available(), reason="the block kernels need g++")
@pytest.mark.parametrize(("lora_rank", "tie_word_embeddings"), [(0, True), (4, False)])
def test_block_format_weights_match_through_the_block_kernels(
    lora_rank: int, tie_word_embeddings: bool
) -> None:
    """A backbone as a Q4_1 GGUF loads (and with LoRA factors merged into it, as the embedded
    default's delta checkpoint loads): the engine multiplies its blocks, not the float32
    weights, and its greedy output is still the reference decoder's."""
    model, tokenizer = model_copy(tie_word_embeddings=tie_word_embeddings)
    make_gguf_like(model.language_model, lora_rank=lora_rank)
    vc = VisualChat(copy.deepcopy(model), tokenizer)
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(
            block_size=4, num_blocks=256, max_num_batched_tokens=13, linear_kernels="blocks"
        ),
    )
    products = engine.runner.linears.products
    assert products and all(p.block_weight is not None for p in products)
    assert all((p.block_weight.low_rank is not None) == bool(lora_rank) for p in products[:-1])
    calls = []
    multiply = BlockWeight.multiply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            BlockWeight,
            "multiply",
            lambda self, rows: calls.append(self.fmt) or multiply(self, rows),
        )
        indices = [0, 1, 2, 5]
        results, _ = run_engine(engine, [(WORKLOAD[i], GREEDY) for i in indices])
    assert set(calls) == {"q4_1", "q8_0"}  # the body's Q4_1 and the head's Q8_0
    for i, result in zip(indices, results, strict=True):
        expected = vc.generate(WORKLOAD[i], GREEDY)
        assert (result.text, result.token_ids) == (expected.text, expected.token_ids), i
    assert_cache_empty(engine)
