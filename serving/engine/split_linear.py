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

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _split_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # (m, in)
    blocks = self.split_weight  # (parts, in, out / parts) strided views of one storage
    out = torch.bmm(rows.unsqueeze(0).expand(blocks.shape[0], -1, -1), blocks)  # (parts, m, out/p)
    out = out.permute(1, 0, 2).reshape(*x.shape[:-1], self.out_features)  # (..., out)
    return out if self.bias is None else out + self.bias


class SplitLinears:
    """Switch a module's float32 `nn.Linear` layers to column-split forwards until `release`."""

    def __init__(self, module: nn.Module, parts: int) -> None:
        if parts < 2:
            raise ValueError(f"a split needs at least 2 parts, got {parts}")
        self.parts = parts
        self.layers: list[nn.Linear] = []
        relaid: set[int] = set()  # tied weights (embeddings = LM head) are one parameter
        with torch.no_grad():
            for layer in module.modules():
                if not self._splittable(layer):
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
        logger.info("%d linear layers split into %d column blocks", len(self.layers), parts)

    def _splittable(self, layer: nn.Module) -> bool:
        # Exactly nn.Linear: quantized and adapter layers are subclasses or other classes with
        # their own kernels. float32 only: bf16/fp16 matmuls go to oneDNN, which threads already.
        return (
            type(layer) is nn.Linear
            and layer.weight.dtype == torch.float32
            and layer.weight.device.type == "cpu"
            and layer.out_features % self.parts == 0
        )

    def release(self) -> None:
        """Give every layer its own forward and its weight its row-major layout back."""
        with torch.no_grad():
            for layer in self.layers:
                del layer.forward, layer.split_weight
                if not layer.weight.is_contiguous():
                    layer.weight.data = layer.weight.data.contiguous()
        self.layers = []
