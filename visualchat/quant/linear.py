"""QuantLinear: an nn.Linear whose weight is stored packed (codes in bit planes + scales).

Design note. On CPU the weight is a storage and memory format: each forward unpacks the planes,
decodes the codes through the format's value table, scales them (float32) and runs the plain
matmul, so the output is exactly F.linear(x, dequantized weight, bias). `keep_dequantized`
trades the memory saving back for speed (the decoded weight is kept between forwards; same
math). On CUDA a fused Triton kernel reads the packed planes and dequantizes tile by tile inside
the matmul, so the full-precision weight never exists in memory. The optional LoRC factors add
(x V^T) U^T after the main product.

Scales stay float32 whatever dtype the model is cast to (`_apply`): they define the dequantized
values, and rounding them to bfloat16 would change every weight of the row.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from visualchat.quant.formats import get_format
from visualchat.quant.lorc import lorc_factors
from visualchat.quant.packing import LAYOUTS, pack_codes, unpack_codes
from visualchat.quant.tensor import (
    QuantizedTensor,
    apply_scales,
    decode_planes,
    group_size_of,
    quantize_tensor,
)

logger = logging.getLogger(__name__)


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str,
        bias: bool = True,
        lorc_rank: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,  # of the bias and LoRC factors
    ) -> None:
        super().__init__()
        spec = get_format(fmt)
        if lorc_rank < 0:
            raise ValueError(f"lorc_rank must be >= 0, got {lorc_rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.layout = LAYOUTS[fmt]
        self.lorc_rank_requested = lorc_rank  # as asked; recorded in checkpoints
        self.lorc_rank = min(lorc_rank, in_features, out_features)
        self.group_size = group_size_of(fmt, in_features)
        self._keep_dequantized = False
        self._dequantized: torch.Tensor | None = None
        num_groups = math.ceil(in_features / self.group_size)
        low_bytes, high_bytes = self.layout.num_bytes(in_features * out_features)
        u8 = {"dtype": torch.uint8, "device": device}
        self.register_buffer("codes_low", torch.zeros(low_bytes, **u8))
        high = torch.zeros(high_bytes, **u8) if high_bytes else None
        self.register_buffer("codes_high", high)  # None: a single plane
        self.register_buffer(
            "scales", torch.ones(out_features, num_groups, dtype=torch.float32, device=device)
        )
        is_asymmetric = not getattr(spec, "is_symmetric", True)
        zeros = torch.zeros(out_features, num_groups, **u8) if is_asymmetric else None
        self.register_buffer("zeros", zeros)  # None: symmetric format
        factory = {"dtype": dtype or torch.float32, "device": device}
        rank = self.lorc_rank
        has_lorc = rank > 0
        self.register_buffer(
            "lorc_u", torch.zeros(out_features, rank, **factory) if has_lorc else None
        )  # (out, r)
        self.register_buffer(
            "lorc_v", torch.zeros(rank, in_features, **factory) if has_lorc else None
        )  # (r, in)
        self.register_parameter(
            "bias", nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        )

    @property
    def keep_dequantized(self) -> bool:
        """Keep the decoded weight between forwards (CPU speed, full-precision memory)."""
        return self._keep_dequantized

    @keep_dequantized.setter
    def keep_dequantized(self, value: bool) -> None:
        self._keep_dequantized = bool(value)
        self._dequantized = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, lorc_rank: int = 0) -> QuantLinear:
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            lorc_rank=lorc_rank,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.load_quantized(quantize_tensor(weight, fmt))
        if layer.lorc_rank:
            error = weight.float() - layer.dequantize_weight(torch.float32)
            u, v = lorc_factors(error, layer.lorc_rank)
            layer.lorc_u.copy_(u)
            layer.lorc_v.copy_(v)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def load_quantized(self, quantized: QuantizedTensor) -> None:
        if quantized.fmt != self.fmt or quantized.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"a {quantized.fmt} tensor of shape {quantized.shape} does not fit a {self.fmt} "
                f"layer of shape {(self.out_features, self.in_features)}"
            )
        low, high = pack_codes(quantized.codes, self.layout)
        self.codes_low.copy_(low)
        if high is not None:
            self.codes_high.copy_(high)
        self.scales.copy_(quantized.scales)
        if quantized.zeros is not None:
            self.zeros.copy_(quantized.zeros)
        self._dequantized = None

    def quantized(self) -> QuantizedTensor:
        """The stored weight, unpacked to codes."""
        shape = (self.out_features, self.in_features)
        codes = unpack_codes(self.codes_low, self.codes_high, self.layout, shape)
        return QuantizedTensor(codes, self.scales, self.zeros, shape, self.fmt)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) weight decoded from the packed planes (LoRC not included)."""
        shape = (self.out_features, self.in_features)
        values = decode_planes(self.codes_low, self.codes_high, self.fmt, shape)  # (out, in)
        weight = apply_scales(values, self.scales, self.zeros, self.fmt)
        return weight if dtype is None else weight.to(dtype)

    def effective_weight(self) -> torch.Tensor:
        """(out, in) float32: the dequantized weight plus the LoRC correction U V."""
        weight = self.dequantize_weight(torch.float32)
        if self.lorc_rank:
            weight = weight + self.lorc_u.float() @ self.lorc_v.float()
        return weight

    def num_stored_bytes(self) -> int:
        """Bytes of the packed planes, scales, zero points and LoRC factors."""
        tensors = [
            self.codes_low,
            self.codes_high,
            self.scales,
            self.zeros,
            self.lorc_u,
            self.lorc_v,
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not self.keep_dequantized and _has_triton():
            from visualchat.quant.kernel import quant_matmul

            flat = x.reshape(-1, self.in_features)  # (tokens, in)
            y = quant_matmul(
                flat,
                self.codes_low,
                self.codes_high,
                self.scales,
                self.zeros,
                self.fmt,
                self.out_features,
            )
            y = y.view(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x, self._weight(x.dtype), self.bias)
        if self.lorc_rank:
            y = y + F.linear(F.linear(x, self.lorc_v), self.lorc_u)
        return y

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.keep_dequantized:
            self._dequantized = None
            return self.dequantize_weight(dtype)
        if self._dequantized is None or self._dequantized.dtype != dtype:
            self._dequantized = self.dequantize_weight(dtype)
        return self._dequantized

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.scales.device)  # float32 kept (see the module docstring)
        self._dequantized = None
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fmt={self.fmt}, bias={self.bias is not None}, lorc_rank={self.lorc_rank}"
        )
