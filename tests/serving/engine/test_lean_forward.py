"""The engine's own forward of Llama-family decoders computes what transformers' forward does
(to the bit where the products are the same), takes only the backbones it knows, and leaves
the rest to transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from engine_testing import (
    GREEDY,
    WORKLOAD,
    give_biases_weight,
    make_engine,
    model_copy,
    record_logits,
    reference,
    run_engine,
)
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)

from serving.engine import Engine, EngineConfig
from serving.engine import lean_forward as lean


@pytest.mark.parametrize(
    ("arch", "attention", "kernels"),
    [
        ("llama", "mmca", "linear"),
        ("llama", "causal", "linear"),
        ("qwen2", "mmca", "linear"),  # q/k/v biases
        ("mistral", "mmca", "linear"),
        ("llama", "mmca", None),  # no stacked products: each layer called
    ],
)
def test_lean_logits_equal_transformers_logits_pass_for_pass(
    arch: str, attention: str, kernels: str | None
) -> None:
    model, tokenizer = model_copy(attention, arch=arch)
    biases = give_biases_weight(model)
    assert bool(biases) == (arch == "qwen2")
    passes = {}
    for on in (True, False):
        config = EngineConfig(
            block_size=4,
            num_blocks=256,
            max_num_batched_tokens=13,
            lean_forward=on,
            linear_kernels=kernels,
        )
        engine = Engine(copy.deepcopy(model), tokenizer, config)
        assert (engine.runner.lean is not None) == on
        passes[on] = record_logits(engine)
        run_engine(engine, [(c, GREEDY) for c in WORKLOAD[:6]])
    assert len(passes[True]) == len(passes[False]) > 20
    # Mixed passes: decodes beside prompt chunks that cut image spans, 13 tokens each.
    for i, (ours, theirs) in enumerate(zip(passes[True], passes[False], strict=True)):
        assert torch.equal(ours, theirs), f"pass {i}: max diff {(ours - theirs).abs().max()}"


def test_unknown_backbones_run_through_transformers_and_still_match() -> None:
    engine = make_engine(arch="phi3", max_num_batched_tokens=13)  # fused qkv_proj: not ours
    assert engine.runner.lean is None
    assert "phi3" in lean.supports(engine.model.language_model)
    ours = engine.generate(WORKLOAD[:3], GREEDY)
    vc = reference(arch="phi3")
    for conversation, out in zip(WORKLOAD[:3], ours, strict=True):
        assert out.token_ids == vc.generate(conversation, GREEDY).token_ids


def test_supports_names_what_it_cannot_run() -> None:
    model, _ = model_copy()
    language_model = model.language_model
    assert lean.supports(language_model) is None
    mlp = language_model.model.layers[1].mlp
    del mlp.up_proj  # e.g. a mixture of experts in place of the MLP
    assert "MLP" in lean.supports(language_model)
    with pytest.raises(ValueError, match="cannot run this backbone"):
        lean.LeanForward(language_model)
    model, _ = model_copy()
    model.language_model.model.norm = nn.LayerNorm(32)
    assert "final norm" in lean.supports(model.language_model)
    model, _ = model_copy()
    model.language_model.model.layers[0].input_layernorm = nn.LayerNorm(32)
    assert "layer norm" in lean.supports(model.language_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7])
def test_rms_norm_is_llamas_to_the_bit(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(dtype)
    x = (3 * torch.randn(rows, 48)).to(dtype)
    with torch.no_grad():
        assert torch.equal(lean.rms_norm(x, norm), norm(x))


@pytest.mark.parametrize("rows", [1, 5])
def test_the_rotation_is_transformers_to_the_bit(rows: int) -> None:
    torch.manual_seed(0)
    heads, kv_heads, d = 4, 2, 16
    q, k = torch.randn(rows, heads, d), torch.randn(rows, kv_heads, d)
    cos, sin = torch.randn(1, rows, d), torch.randn(1, rows, d)  # as the rotary module gives
    # transformers: (batch, heads, tokens, d) with cos/sin (batch, tokens, d)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    # ours: queries and keys side by side, (tokens, heads + kv_heads, d)
    both = lean.rotate(torch.cat((q, k), dim=1), cos[0, :, None], lean.signed_sin(sin[0, :, None]))
    assert torch.equal(both[:, :heads], q_ref[0].transpose(0, 1))
    assert torch.equal(both[:, heads:], k_ref[0].transpose(0, 1))


class Doubled(nn.Module):
    """Not an nn.Linear (as a quantized or adapter layer is not): called as a module."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.out_features = inner.out_features
        self.weight = inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.inner(x)


def test_a_projection_joins_its_members_outputs_whatever_they_are() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(8, 6, bias=True), nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        joined = lean.Projection([a, Doubled(b)])(x)
        assert torch.equal(joined, torch.cat((a(x), 2 * b(x)), dim=-1))
        assert torch.equal(lean.Projection([a])(x), a(x))
