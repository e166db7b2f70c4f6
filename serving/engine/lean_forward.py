"""The engine's own forward of Llama-family decoders over one flat ragged pass.

Why. On CPU a decode step of a small model is mostly not arithmetic: transformers' modules spend
about as much time in Python and small ops as the weights take to read. Profiled on the
embedded default (30 layers, one sequence, host B; `benchmarks/engine_step_profile.py`), a 52 ms
decode step held 25-27 ms of weight products; the rest went to some 400 module calls and 2,300
op calls (norms in eight ops each, rotary embeddings in seven per tensor, attention glue), each
slower in place than alone because the weight streams between them evict the caches. FastGen and
vLLM run their own model implementations for the same reason. This one is the same arithmetic
written out flat, in 1,500 op calls a step and no module calls:

- the q/k/v and gate/up products through the engine's stacked weights (`linear_kernels`), one
  product each, their outputs taken as views;
- rotary embedding of queries and keys together, from the backbone's own rotary module;
- RMSNorm as the backbone computes it, the ops in the same order;
- `paged_attention` called directly on (tokens, heads, head_dim) views;
- the final norm and the head only on the rows that are sampled.

Every elementwise op is the backbone's own, in its order, so each position's values are the
module path's to the bit where the products are (the tests compare the two on every
architecture it takes). Anything it does not know is left to transformers: `supports` names the
reason, and the runner then calls the backbone's forward as before. Known layers: Llama,
Mistral and Qwen2 decoder layers; their linear layers may be of any module type (a quantized or
an adapter layer is called as a module). Interleaved with transformers' forward on host B
(`benchmarks/engine_ab.py`) its decode steps took 0.82-0.87x the time with one sequence and
0.87-0.95x with 16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from serving.engine.paged_attention import PagedBatch, paged_attention

# Backbones whose decoder layer is exactly: pre-norm (RMSNorm), attention with q/k/v/o
# projections and rotate-half rotary embedding, residual; pre-norm, act(gate) * up -> down,
# residual. (Qwen2's q/k/v carry biases; Mistral's sliding window the engine ignores anyway.)
MODEL_TYPES = ("llama", "mistral", "qwen2")
# RMSNorm classes that compute w * (x * rsqrt(mean(x^2) + eps)) in float32, as LlamaRMSNorm.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def supports(language_model: nn.Module) -> str | None:
    """None when the lean forward can run this causal LM; else why not."""
    config = getattr(language_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model type {model_type!r} is not one of {MODEL_TYPES}"
    body = getattr(language_model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "no decoder body with layers and a rotary embedding"
    if type(getattr(body, "norm", None)).__name__ not in RMS_NORMS:
        return f"final norm is not one of {RMS_NORMS}"
    if not isinstance(getattr(language_model, "lm_head", None), nn.Module):
        return "no lm_head"
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return "a layer without self_attn or mlp"
        if any(not hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q/k/v/o projections"
        if any(not hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "an MLP that is not act(gate) * up -> down (a mixture of experts?)"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ not in RMS_NORMS:
                return f"a layer norm that is not one of {RMS_NORMS}"
    return None


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """LlamaRMSNorm.forward, the same ops in the same order, without the module call (and
    without its casts where x is float32 already: each is a dispatch per norm)."""
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.to(torch.float32)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (normed if dtype == torch.float32 else normed.to(dtype))


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, so that rotate_half(x) * sin == x.roll(half) * this:
    cat(-x2, x1) * sin and cat(x2, x1) * cat(-sin1, sin2) are the same products, to the bit
    (a negation is exact), in one op per pass instead of four per layer."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on (tokens, heads, d), cos/sin_signed (tokens, 1, d)."""
    return (x * cos) + (x.roll(x.shape[-1] // 2, dims=-1) * sin_signed)


class Projection:
    """Sibling linear layers that read the same input (q/k/v, gate/up, or one alone), as one
    (rows, sum of outs) output: one product through the engine's stacked weights when the layers
    have one (`linear_kernels`), else each layer called and the outputs joined. The members'
    biases are joined once, here: the engine holds the model unchanged while it serves."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        product = getattr(layers[0], "engine_product", None)
        members = None if product is None else [id(layer) for layer in product.layers]
        self.product = product if members == [id(layer) for layer in layers] else None
        biases = [getattr(layer, "bias", None) for layer in layers]
        self.bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [
                    b if b is not None else layer.weight.new_zeros(layer.out_features)
                    for b, layer in zip(biases, layers, strict=True)
                ]
            )
        )  # (sum of outs,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, in)
        if self.product is None:
            outs = [layer(x) for layer in self.layers]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        kernel = self.layers[0].engine_linears.choice.kernel_for(x.shape[0])
        full = self.product.multiply(x, kernel)  # (rows, sum of outs)
        return full if self.bias is None else full + self.bias


@dataclass
class _Layer:
    index: int
    input_norm: nn.Module
    qkv: Projection
    o_proj: Projection
    post_norm: nn.Module
    gate_up: Projection
    down: Projection
    act: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


class LeanForward:
    """logits = LeanForward(language_model)(embeds, positions, batch, sample_rows).

    Built after the engine's linear kernels are installed (it reads their stacked products);
    holds no weights of its own."""

    def __init__(self, language_model: nn.Module) -> None:
        reason = supports(language_model)
        if reason is not None:
            raise ValueError(f"the lean forward cannot run this backbone: {reason}")
        body = language_model.model
        config = language_model.config
        self.rotary = body.rotary_emb
        self.final_norm = body.norm
        self.head = Projection([language_model.lm_head])
        self.layers = []
        for index, layer in enumerate(body.layers[: config.num_hidden_layers]):
            attn, mlp = layer.self_attn, layer.mlp
            head_dim = attn.head_dim
            self.layers.append(
                _Layer(
                    index=attn.layer_idx if attn.layer_idx is not None else index,
                    input_norm=layer.input_layernorm,
                    qkv=Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
                    o_proj=Projection([attn.o_proj]),
                    post_norm=layer.post_attention_layernorm,
                    gate_up=Projection([mlp.gate_proj, mlp.up_proj]),
                    down=Projection([mlp.down_proj]),
                    act=(
                        torch.nn.functional.silu
                        if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
                        else mlp.act_fn
                    ),
                    num_heads=config.num_attention_heads,
                    num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
                    head_dim=head_dim,
                    scaling=attn.scaling,
                )
            )

    def __call__(
        self,
        embeds: torch.Tensor,  # (tokens, hidden)
        positions: torch.Tensor,  # (tokens,) absolute position of every row
        batch: PagedBatch,
        sample_rows: torch.Tensor,  # (s,) rows whose next token is sampled
    ) -> torch.Tensor:
        """Logits of the sampled rows: (s, vocab)."""
        tokens = embeds.shape[0]
        cos, sin = self.rotary(embeds[None], positions[None])  # (1, tokens, d) each
        cos, sin = cos[0, :, None], signed_sin(sin[0, :, None])  # (tokens, 1, d)
        hidden = embeds
        for layer in self.layers:
            heads, kv_heads, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
            x = rms_norm(hidden, layer.input_norm)
            qkv = layer.qkv(x)  # (tokens, (heads + 2 * kv_heads) * d)
            # Queries and keys sit side by side: one rotation for both.
            qk, v = qkv.split(((heads + kv_heads) * d, kv_heads * d), dim=-1)
            qk = rotate(qk.view(tokens, heads + kv_heads, d), cos, sin)
            q, k = qk.split((heads, kv_heads), dim=1)  # (tokens, heads | kv_heads, d)
            v = v.view(tokens, kv_heads, d)
            attended = paged_attention(batch, layer.index, q, k, v, layer.scaling)
            hidden = hidden + layer.o_proj(attended.reshape(tokens, heads * d))
            x = rms_norm(hidden, layer.post_norm)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)  # (tokens, intermediate) each
            hidden = hidden + layer.down(layer.act(gate) * up)
        return self.logits(hidden, sample_rows)

    def logits(self, hidden: torch.Tensor, sample_rows: torch.Tensor) -> torch.Tensor:
        """The head over the final norm of the sampled rows of the last layer's output:
        (s, vocab)."""
        hidden = rms_norm(hidden.index_select(0, sample_rows), self.final_norm)  # (s, hidden)
        return self.head(hidden)
