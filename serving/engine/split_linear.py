"""Split linear layers for small-batch passes on a multi-core CPU.

Why. A decode pass multiplies a handful of rows by every weight matrix, so it is bound by reading
the weights. On CPU, torch's `linear` with one row goes to MKL's gemv, which runs on one thread:
~12 GB/s on the 2-core development machine, against ~36 GB/s that a two-thread read achieves.
Cut into P blocks of output rows, the same weight becomes one `bmm` of P matrix products run on
P threads, each streaming its contiguous block: 36-42 GB/s for every matrix of the embedded
model with one row (measured with weights that do not fit in cache). It is also the faster
layout tried for 4-256 rows; a first version multiplied the rows by column blocks of a
transposed copy, which streams narrow blocks (288 columns) at only 15-19 GB/s.

How. While the engine holds the model, every float32 `nn.Linear` of the backbone runs its
forward as that `bmm` over a (P, out/P, in) view of its own weight: nothing is copied or
re-laid. Siblings that read the same input (q/k/v, gate/up) get their weights stacked in one
storage, each weight a contiguous row range of it, so each group is one product. `release`
gives every layer its own forward and every stacked weight its own storage back.

The sums are the same dot products in a different kernel, so results differ from `linear` in the
last bits (~1e-4 absolute on the embedded model's logits); the engine's greedy output still
equals the reference decoder's in the tests and the benchmark, which check it.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Sibling layers that read the same input one after another in the usual decoder blocks
# (transformers' Llama, Mistral, Qwen2, ...): their weights are stacked in one storage and read by
# one bmm, so a decode pass makes 4 products per layer instead of 7 (fewer, larger reads).
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


def _matmul_blocks(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # (m, in)
    columns = rows.t().unsqueeze(0).expand(blocks.shape[0], -1, -1)  # (parts, in, m)
    out = torch.bmm(blocks, columns)  # (parts, out / parts, m)
    return out.permute(2, 0, 1).reshape(*x.shape[:-1], out_features)  # (..., out)


def _split_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = _matmul_blocks(x, self.split_weight, self.out_features)
    return out if self.bias is None else out + self.bias


class _FusedSiblings:
    """Layers whose weights are row ranges of one (sum of outs, in) storage. The first call on
    an input computes every member's output; each member then takes its own. A member called on
    another input (or twice on the same one) recomputes, so the result never depends on the call
    order."""

    def __init__(self, layers: list[nn.Linear], parts: int) -> None:
        self.layers = layers
        self.out_features = sum(layer.out_features for layer in layers)
        storage = torch.cat([layer.weight.data for layer in layers])  # (sum of outs, in)
        self.bounds: list[tuple[int, int]] = []
        for layer in layers:
            start = self.bounds[-1][1] if self.bounds else 0
            self.bounds.append((start, start + layer.out_features))
            layer.weight.data = storage[start : start + layer.out_features]  # contiguous rows
        self.blocks = storage.view(parts, -1, storage.shape[1])  # (parts, outs / parts, in)
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}

    def output(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.input is not x or id(layer) not in self.outputs:
            full = _matmul_blocks(x, self.blocks, self.out_features)  # (..., sum of outs)
            self.outputs = {}
            for member, (start, end) in zip(self.layers, self.bounds, strict=True):
                out = full[..., start:end].contiguous()
                self.outputs[id(member)] = out if member.bias is None else out + member.bias
            self.input = x
        out = self.outputs.pop(id(layer))
        if not self.outputs:
            self.input = None  # everyone has theirs: hold no activations between passes
        return out


def _fused_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.fused_siblings.output(self, x)


class SplitLinears:
    """Switch a module's float32 `nn.Linear` layers to row-block forwards until `release`."""

    def __init__(
        self, module: nn.Module, parts: int, fuse: Sequence[Sequence[str]] = FUSED_SIBLINGS
    ) -> None:
        if parts < 2:
            raise ValueError(f"a split needs at least 2 parts, got {parts}")
        self.parts = parts
        self.layers: list[nn.Linear] = []
        self.num_fused = 0
        with torch.no_grad():
            fused = self._fuse(module, fuse)
            for layer in module.modules():
                if not self._splittable(layer) or id(layer) in fused:
                    continue
                # (parts, out / parts, in): block p is output rows p*out/parts.. of the weight
                layer.split_weight = layer.weight.data.view(parts, -1, layer.in_features)
                layer.forward = types.MethodType(_split_forward, layer)
                self.layers.append(layer)
        logger.info(
            "%d linear layers split into %d row blocks (%d sibling groups stacked)",
            len(self.layers),
            parts,
            self.num_fused,
        )

    def _fuse(self, module: nn.Module, fuse: Sequence[Sequence[str]]) -> set[int]:
        fused: set[int] = set()
        for parent in module.modules():
            for names in fuse:
                layers = [getattr(parent, name, None) for name in names]
                if (
                    not all(self._splittable(layer, whole=False) for layer in layers)
                    or len({layer.in_features for layer in layers}) != 1
                ):
                    continue
                weights = {id(layer.weight) for layer in layers}
                if len(weights) != len(layers) or sum(x.out_features for x in layers) % self.parts:
                    continue
                siblings = _FusedSiblings(layers, self.parts)
                for layer in layers:
                    layer.fused_siblings = siblings
                    layer.forward = types.MethodType(_fused_forward, layer)
                    self.layers.append(layer)
                    fused.add(id(layer))
                self.num_fused += 1
        return fused

    def _splittable(self, layer: nn.Module | None, whole: bool = True) -> bool:
        # Exactly nn.Linear: quantized and adapter layers are subclasses or other classes with
        # their own kernels. float32 only: bf16/fp16 matmuls go to oneDNN, which threads already.
        # whole: its own output rows split evenly (a stacked group checks its total instead).
        return (
            type(layer) is nn.Linear
            and layer.weight.dtype == torch.float32
            and layer.weight.device.type == "cpu"
            and layer.weight.is_contiguous()
            and (not whole or layer.out_features % self.parts == 0)
        )

    def release(self) -> None:
        """Give every layer its own forward and every stacked weight its own storage back."""
        with torch.no_grad():
            for layer in self.layers:
                del layer.forward
                if "fused_siblings" in vars(layer):
                    del layer.fused_siblings
                    layer.weight.data = layer.weight.data.clone()  # savable on its own again
                else:
                    del layer.split_weight
        self.layers = []
