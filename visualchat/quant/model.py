"""Quantizing a model: swap its nn.Linear layers for QuantLinear, and describe what was swapped
so that a checkpoint can rebuild the same modules before loading the packed tensors.

Only the language backbone's linears are quantized by default: the vision tower and projector
are small and sensitive, the embeddings are lookups, and the output head is often tied to them.
A weight shared with another module (a tied head) is never quantized: tying would overwrite it.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from visualchat.quant.formats import get_format
from visualchat.quant.linear import QuantLinear
from visualchat.quant.tensor import sqnr_db

logger = logging.getLogger(__name__)

DEFAULT_SKIP = ("vision", "projector", "lm_head", "embed_tokens")
CONFIG_VERSION = 1


@dataclass
class LayerReport:
    name: str  # qualified module name
    shape: tuple[int, int]  # (out_features, in_features)
    sqnr_db: float  # effective weight (dequantized + LoRC) against the original, in dB
    num_bytes: int  # stored: packed codes, scales, zero points, LoRC factors
    num_lorc_bytes: int  # of which LoRC factors

    @property
    def num_bytes_bf16(self) -> int:
        return 2 * self.shape[0] * self.shape[1]


@dataclass
class QuantizationReport:
    fmt: str
    lorc_rank: int
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return sum(layer.num_bytes for layer in self.layers)

    @property
    def num_bytes_bf16(self) -> int:
        return sum(layer.num_bytes_bf16 for layer in self.layers)

    @property
    def median_sqnr_db(self) -> float:
        return statistics.median(layer.sqnr_db for layer in self.layers)

    @property
    def min_sqnr_db(self) -> float:
        return min(layer.sqnr_db for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.fmt,
            "lorc_rank": self.lorc_rank,
            "num_layers": len(self.layers),
            "linear_bytes": self.num_bytes,
            "linear_bytes_bf16": self.num_bytes_bf16,
            "ratio_vs_bf16": self.num_bytes / self.num_bytes_bf16 if self.layers else None,
            "sqnr_db_median": self.median_sqnr_db if self.layers else None,
            "sqnr_db_min": self.min_sqnr_db if self.layers else None,
        }


def _is_skipped(name: str, skip: Sequence[str]) -> bool:
    return any(part in skip for part in name.split("."))


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def quantizable_linears(
    model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP
) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the nn.Linear layers quantize_model would replace. Exact nn.Linear
    only: subclasses such as nn.MultiheadAttention's out_proj are read through `.weight`."""
    shared = _shared_weights(model)
    found = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or _is_skipped(name, skip):
            continue
        if id(module.weight) in shared:
            logger.info("not quantizing %s: its weight is tied to another module", name)
            continue
        found.append((name, module))
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    fmt: str,
    lorc_rank: int = 0,
    skip: Sequence[str] = DEFAULT_SKIP,
) -> QuantizationReport:
    """Replace, in place, every nn.Linear not under a `skip` name component (by default the
    backbone's linears) with a QuantLinear of the format; LoRC of rank lorc_rank when > 0."""
    get_format(fmt)
    if lorc_rank < 0:
        raise ValueError(f"lorc_rank must be >= 0, got {lorc_rank}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model is already quantized; quantize a full-precision copy")
    report = QuantizationReport(fmt, lorc_rank)
    for name, linear in quantizable_linears(model, skip):
        layer = QuantLinear.from_linear(linear, fmt, lorc_rank)
        lorc_bytes = sum(
            t.numel() * t.element_size() for t in (layer.lorc_u, layer.lorc_v) if t is not None
        )
        report.layers.append(
            LayerReport(
                name=name,
                shape=(linear.out_features, linear.in_features),
                sqnr_db=sqnr_db(linear.weight, layer.effective_weight()),
                num_bytes=layer.num_stored_bytes(),
                num_lorc_bytes=lorc_bytes,
            )
        )
        _set_module(model, name, layer)
    if not report.layers:
        logger.warning("quantize_model found no nn.Linear to quantize (skip=%s)", skip)
    return report


def quant_config(model: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint records to rebuild the QuantLinear modules; None if none."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    kinds = {(m.fmt, m.lorc_rank_requested) for _, m in layers}
    if len(kinds) > 1:
        raise ValueError(f"a checkpoint holds one quantization format, found {sorted(kinds)}")
    ((fmt, rank),) = kinds
    return {
        "version": CONFIG_VERSION,
        "format": fmt,
        "lorc_rank": rank,
        "modules": [name for name, _ in layers],
    }


def prepare_quantized(model: nn.Module, config: dict[str, Any]) -> None:
    """Swap the named nn.Linear modules for empty QuantLinear ones of the recorded format, so
    that loading the checkpoint's state dict fills their packed planes."""
    if config.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        raise ValueError(f"unsupported quantization config version {config.get('version')}")
    fmt = config["format"]
    get_format(fmt)
    rank = int(config.get("lorc_rank", 0))
    for name in config["modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized module {name!r} is not in the model") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantized module {name!r} is a {type(linear).__name__}, not Linear")
        weight = linear.weight
        layer = QuantLinear(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            lorc_rank=rank,
            device=weight.device,
            dtype=weight.dtype,
        )
        _set_module(model, name, layer)


@contextmanager
def dequantized_weights(model: nn.Module) -> Iterator[None]:
    """Keep every QuantLinear's decoded weight between forwards (CPU speed for evaluation;
    same outputs, full-precision memory) and drop them on exit."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.keep_dequantized = True
    try:
        yield
    finally:
        for layer in layers:
            layer.keep_dequantized = False


def module_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total
