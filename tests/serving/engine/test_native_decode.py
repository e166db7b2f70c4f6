"""The native decode pass: decode-only passes of a block-format backbone run every layer in one
native call, compute what the lean forward computes (to float32 rounding), keep greedy output
equal to the reference decoder's, and leave every pass it cannot take to the lean forward."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from block_formats import make_gguf_like
from engine_testing import (
    GREEDY,
    MODEL_SEED,
    WORKLOAD,
    assert_cache_empty,
    give_biases_weight,
    model_copy,
    record_logits,
    run_engine,
)
from factories import make_backbone_config, make_config, make_tokenizer
from transformers import AutoModelForCausalLM

from serving.engine import Engine, EngineConfig, block_kernels
from serving.engine import native_decode as native
from serving.engine.linear_kernels import KernelChoice
from serving.engine.paged_attention import PagedKVStore
from visualchat.api import VisualChat
from visualchat.model.loading import build_model
from visualchat.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    not block_kernels.available(), reason="the native decode pass needs a C++ compiler (g++)"
)


def gguf_like_model(attention: str = "mmca", arch: str = "llama", lora_rank: int = 0):
    """A tiny model whose backbone weights are exactly Q4_1 (head Q8_0), as the embedded
    default's are, with LoRA factors merged in where lora_rank > 0."""
    model, tokenizer = model_copy(attention, arch=arch)
    assert bool(give_biases_weight(model)) == (arch == "qwen2")
    make_gguf_like(model.language_model, lora_rank=lora_rank)
    return model, tokenizer


def gguf_like_engine(model, tokenizer, **config) -> Engine:
    """An engine multiplying by the block kernels at every pass size, as the embedded default's
    one-row passes are."""
    config.setdefault("block_size", 4)
    config.setdefault("num_blocks", 256)
    config.setdefault("max_num_batched_tokens", 13)
    config.setdefault("linear_kernels", "blocks")
    return Engine(model, tokenizer, EngineConfig(**config))


def count_native_passes(engine: Engine) -> list[int]:
    """Rows of every pass the native decode pass runs, in order; checks on the way that the
    decode mirror holds no copies while it runs (it would only hold stale ones)."""
    rows: list[int] = []
    native_pass = engine.runner.native

    class Counting:
        def __getattr__(self, name):
            return getattr(native_pass, name)

        def __call__(self, embeds, *args):
            rows.append(embeds.shape[0])
            assert engine.runner.mirror.num_bytes == 0
            return native_pass(embeds, *args)

    engine.runner.native = Counting()
    return rows


@pytest.mark.parametrize(
    ("arch", "attention", "lora_rank"),
    [("llama", "mmca", 0), ("llama", "causal", 4), ("qwen2", "mmca", 4)],  # qwen2: biases
)
def test_native_passes_compute_the_lean_forwards_logits(
    arch: str, attention: str, lora_rank: int
) -> None:
    """Pass for pass against the same engine without it: the same passes, the same greedy
    tokens, and logits equal to float32 rounding (its sums run in another order)."""
    passes, native_rows = {}, None
    for on in (True, False):
        engine = gguf_like_engine(*gguf_like_model(attention, arch, lora_rank), native_decode=on)
        assert (engine.runner.native is not None) == on
        if on:
            native_rows = count_native_passes(engine)
        passes[on] = record_logits(engine)
        run_engine(engine, [(c, GREEDY) for c in WORKLOAD[:6]])
    # Decodes of up to six sequences, after prompts in chunks of 13 that cut image spans.
    assert len(native_rows) >= 10 and max(native_rows) >= 3
    assert len(passes[True]) == len(passes[False]) > len(native_rows)
    for i, (ours, theirs) in enumerate(zip(passes[True], passes[False], strict=True)):
        assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist(), f"pass {i}"
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"pass {i}")


@pytest.mark.parametrize(
    ("attention", "budget", "requests", "native_attention"),
    [
        ("mmca", 64, 10, True),
        ("mmca", 64, 10, False),
        ("causal", 64, 10, True),
        ("mmca", 1, 4, True),
    ],
)
def test_greedy_output_through_native_passes_is_the_reference_decoders(
    attention: str, budget: int, requests: int, native_attention: bool
) -> None:
    """Many requests with 0-3 images, several rounds, decode passes beside and between prompt
    chunks: the native passes and the lean forward's passes take turns over the same sequences
    (their decode groups attending natively from the slots, or through the decode mirror), and
    every reply is the reference decoder's. With a budget of 1 every pass is one token, so the
    prompts go through the native pass too: image queries included."""
    model, tokenizer = gguf_like_model(attention, lora_rank=4)
    reference = VisualChat(copy.deepcopy(model), tokenizer)
    engine = gguf_like_engine(
        model, tokenizer, max_num_batched_tokens=budget, native_attention=native_attention
    )
    native_rows = count_native_passes(engine)
    prompts = [(c, GREEDY) for c in WORKLOAD[:requests]]
    results, handled = run_engine(engine, prompts)
    if budget == 1:  # every token a pass of its own, but the last reply token of each
        assert len(native_rows) == sum(r.num_tokens - 1 for r in handled)
    else:
        assert len(native_rows) >= 10 and max(native_rows) >= 3
    for i, result in enumerate(results):
        expected = reference.generate(WORKLOAD[i], GREEDY)
        assert (result.text, result.token_ids) == (expected.text, expected.token_ids), i
    if not native_attention:  # the mirror held the lean forward's decode groups between steps
        assert engine.runner.mirror.num_appends > 0
    assert_cache_empty(engine)


def test_passes_where_the_block_kernels_lose_run_the_lean_forward() -> None:
    engine = gguf_like_engine(*gguf_like_model())
    engine.runner.native.choice = KernelChoice({1: "blocks", 8: "blocks", 64: "linear"})
    assert engine.runner.native.takes(1) and engine.runner.native.takes(16)
    assert not engine.runner.native.takes(40)


def test_backbones_it_cannot_take_run_the_lean_forward_and_say_why(caplog) -> None:
    model, tokenizer = gguf_like_model()
    with caplog.at_level(logging.INFO, logger="serving.engine.runner"):
        floats = gguf_like_engine(
            copy.deepcopy(model), tokenizer, linear_kernels="linear", block_kernels=False
        )
    assert floats.runner.lean is not None and floats.runner.native is None
    assert "not held in a block format" in caplog.text
    for layer in model.language_model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    gelu = gguf_like_engine(model, tokenizer)
    assert gelu.runner.lean is not None and gelu.runner.native is None
    assert native.supports(gelu.runner.lean, gelu.runner.store) == (
        "an MLP activation other than SiLU"
    )
    engine = gguf_like_engine(*gguf_like_model())
    half = PagedKVStore(2, 64, 2, 8, torch.float16, torch.device("cpu"))
    assert "not CPU float32" in native.supports(engine.runner.lean, half)


def test_key_slots_that_do_not_end_at_the_new_slot_are_refused() -> None:
    engine = gguf_like_engine(*gguf_like_model())
    hidden = engine.model.language_model.config.hidden_size
    embeds = torch.randn(1, hidden)
    with pytest.raises(ValueError, match="new slot"):
        engine.runner.native(
            embeds, torch.tensor([2]), torch.tensor([7]), torch.tensor([[4, 5, 6]])
        )


def wide_model(head_dim: int, attention: str = "mmca"):
    """A tiny GGUF-like model whose heads are `head_dim` wide (4 query heads, 2 kv heads): the
    attention's vector paths (whole multiples of 16) rather than the any-width one the default
    tiny model's 8 takes."""
    tokenizer = make_tokenizer()
    config = make_backbone_config(tokenizer, hidden_size=4 * head_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        backbone = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = build_model(make_config(attention), backbone.float().eval(), seed=MODEL_SEED)
    make_gguf_like(model.language_model, lora_rank=4)
    return model, tokenizer


@pytest.mark.parametrize("head_dim", [16, 64])
def test_wide_heads_match_the_lean_forward_and_the_reference(head_dim: int) -> None:
    model, tokenizer = wide_model(head_dim)
    assert model.language_model.config.head_dim == head_dim
    reference = VisualChat(copy.deepcopy(model), tokenizer)
    passes = {}
    for on in (True, False):
        engine = gguf_like_engine(copy.deepcopy(model), tokenizer, native_decode=on)
        native_rows = count_native_passes(engine) if on else None
        passes[on] = record_logits(engine)
        results, _ = run_engine(engine, [(c, GREEDY) for c in WORKLOAD[:6]])
        if on:
            assert len(native_rows) >= 10
            for i, result in enumerate(results):
                expected = reference.generate(WORKLOAD[i], GREEDY)
                assert result.token_ids == expected.token_ids, i
    assert len(passes[True]) == len(passes[False])
    for i, (ours, theirs) in enumerate(zip(passes[True], passes[False], strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"pass {i}")


def test_the_vector_exponential_is_within_two_ulp_and_zero_where_exp_is_not_normal() -> None:
    library = block_kernels.library()
    x = torch.cat(
        [torch.linspace(-87.3, 88.0, 16 * 4000), torch.randn(16 * 1000) * 10, -torch.rand(160)]
    )
    y = torch.empty_like(x)
    library.vc_exp16(x.data_ptr(), len(x), y.data_ptr())
    expected = torch.exp(x)
    ulp = (torch.nextafter(expected, torch.tensor(float("inf"))) - expected).abs()
    assert bool(((y - expected).abs() <= 2 * ulp).all()), float(((y - expected).abs() / ulp).max())
    low = torch.tensor([-87.4, -90.0, -104.0, -200.0, -1e30, -float("inf")] + [0.0] * 10)
    library.vc_exp16(low.data_ptr(), 16, y[:16].data_ptr())
    assert y[:6].tolist() == [0.0] * 6 and y[6:16].tolist() == [1.0] * 10


def test_preempted_and_recomputed_sequences_decode_natively_to_the_same_replies() -> None:
    """A cache too small for all ten requests: the newest are preempted, their prompts and
    replies recomputed into other slots, and decoding resumes through the native pass."""
    model, tokenizer = gguf_like_model(lora_rank=4)
    reference = VisualChat(copy.deepcopy(model), tokenizer)
    engine = gguf_like_engine(model, tokenizer, max_num_batched_tokens=64, num_blocks=40)
    native_rows = count_native_passes(engine)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    results, requests = run_engine(engine, [(c, params) for c in WORKLOAD])
    assert sum(r.num_preemptions for r in requests) >= 1 and len(native_rows) >= 10
    for i, result in enumerate(results):
        assert result.token_ids == reference.generate(WORKLOAD[i], params).token_ids, i
    assert_cache_empty(engine)
