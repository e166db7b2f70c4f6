"""Column-split linear layers for small-batch passes on a multi-core CPU.

Why. A decode pass multiplies a handful of rows by every weight matrix, so it is bound by reading
the weights. On CPU, torch's `linear` with one row goes to MKL's gemv, which runs on one thread:
~12 GB/s on the 2-core development machine, against ~36 GB/s that a two-thread read achieves.
`bmm` over P column blocks of the weight runs the blocks on P threads and reads the weights at
~23 GB/s in a whole decode pass (~42 GB/s on the 113 MB LM head alone), for the same arithmetic.
At 64-256 rows (prefill chunks) it is as fast as `linear` (measured in the session note).

How. While the engine holds the model, every float32 `nn.Linear` of the backbone keeps its weight
transposed in memory, (in, out) row-major, which is the same values in the same parameter
(`weight` becomes a column-major view, so code outside the engine still sees an (out, in)
tensor and `linear` on it is still correct). Its forward becomes one `bmm` of the rows against P
strided views of that storage, the column blocks. No weight is copied for good: `release` gives
every weight its row-major layout back.

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
# (transformers' Llama, Mistral, Qwen2, ...): their weights are laid side by side and read by one
# bmm, so a decode pass makes 4 weight reads per layer instead of 7 (~15% faster on 2 cores).
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


def _matmul_blocks(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # (m, in)
    out = torch.bmm(rows.unsqueeze(0).expand(blocks.shape[0], -1, -1), blocks)  # (parts, m, w)
    return out.permute(1, 0, 2).reshape(*x.shape[:-1], out_features)  # (..., out)


def _split_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = _matmul_blocks(x, self.split_weight, self.out_features)
    return out if self.bias is None else out + self.bias


class _FusedSiblings:
    """Layers whose weights share one (in, sum of outs) storage. The first call on an input
    computes every member's output; each member then takes its own. A member called on another
    input (or twice on the same one) recomputes, so the result never depends on the call order."""

    def __init__(self, layers: list[nn.Linear], parts: int) -> None:
        self.layers = layers
        self.out_features = sum(layer.out_features for layer in layers)
        storage = torch.cat([layer.weight.data.t() for layer in layers], dim=1)  # (in, out)
        self.bounds: list[tuple[int, int]] = []
        for layer in layers:
            start = self.bounds[-1][1] if self.bounds else 0
            self.bounds.append((start, start + layer.out_features))
            layer.weight.data = storage[:, start : start + layer.out_features].t()
        width = self.out_features // parts
        self.blocks = storage.as_strided(
            (parts, storage.shape[0], width), (width, self.out_features, 1)
        )  # (parts, in, width)
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}

    def output(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.input is not x or id(layer) not in self.outputs:
            full = _matmul_blocks(x, self.blocks, self.out_features)  # (..., sum of outs)
            self.outputs = {}
            for member, (start, end) in zip(self.layers, self.bounds, strict=True):
                out = full[..., start:end]
                self.outputs[id(member)] = (
                    out.contiguous() if member.bias is None else out + member.bias
                )
            self.input = x
        out = self.outputs.pop(id(layer))
        if not self.outputs:
            self.input = None  # everyone has theirs: hold no activations between passes
        return out


def _fused_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.fused_siblings.output(self, x)


class SplitLinears:
    """Switch a module's float32 `nn.Linear` layers to column-split forwards until `release`."""

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
            relaid: set[int] = set()  # tied weights (embeddings = LM head) are one parameter
            for layer in module.modules():
                if not self._splittable(layer) or id(layer) in fused:
                    continue
                weight = layer.weight
                if id(weight) not in relaid:
                    weight.data = weight.data.t().contiguous().t()  # (out, in) column-major
                    relaid.add(id(weight))
                storage = weight.data.t()  # (in, out) row-major
                width = layer.out_features // parts
                layer.split_weight = storage.as_strided(
                    (parts, layer.in_features, width), (width, layer.out_features, 1)
                )  # (parts, in, width): block p holds output columns p*width..(p+1)*width-1
                layer.forward = types.MethodType(_split_forward, layer)
                self.layers.append(layer)
        logger.info(
            "%d linear layers split into %d column blocks (%d sibling groups fused)",
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
        # whole: the layer's own columns split evenly (a fused group checks its total instead).
        return (
            type(layer) is nn.Linear
            and layer.weight.dtype == torch.float32
            and layer.weight.device.type == "cpu"
            and (not whole or layer.out_features % self.parts == 0)
        )

    def release(self) -> None:
        """Give every layer its own forward and its weight its row-major layout back."""
        with torch.no_grad():
            for layer in self.layers:
                del layer.forward
                for name in ("split_weight", "fused_siblings"):
                    if name in vars(layer):
                        delattr(layer, name)
                if not layer.weight.is_contiguous():
                    layer.weight.data = layer.weight.data.contiguous()
        self.layers = []
