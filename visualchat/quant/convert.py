"""`visualchat quantize`: load a model, quantize its backbone, write a quantized checkpoint.

The output is an ordinary VisualChat checkpoint folder (written atomically by
`loading.save_pretrained`) whose config carries a "quantization" entry and whose safetensors
file holds the packed planes, scales and zero points in place of the linear weights, so
`VisualChat.from_pretrained(out)`, `Engine.from_pretrained(out)` and the session API load it
as they load any checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from visualchat.model import loading
from visualchat.model.modeling import VisualChatModel
from visualchat.quant.model import DEFAULT_SKIP, QuantizationReport, module_bytes, quantize_model

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"


@dataclass
class ConversionReport:
    source: str  # "embedded" or the source checkpoint folder
    output: str  # the quantized checkpoint folder
    quantization: QuantizationReport
    model_bytes_before: int  # parameters + buffers in memory, before quantization
    model_bytes_after: int  # ... after
    disk_bytes: int  # every file of the output folder
    weights_file_bytes: int  # its model.safetensors
    seconds: float

    def summary(self) -> str:
        q = self.quantization
        lines = [
            f"quantized {self.source} -> {self.output} ({q.fmt}, LoRC rank {q.lorc_rank}) "
            f"in {self.seconds:.1f} s",
            f"  linear layers   {len(q.layers)} quantized",
            f"  linear weights  {_size(q.num_bytes)} stored vs {_size(q.num_bytes_bf16)} in bf16"
            f" ({q.num_bytes / max(q.num_bytes_bf16, 1):.3f}x)",
            f"  SQNR            median {q.median_sqnr_db:.1f} dB, min {q.min_sqnr_db:.1f} dB"
            if q.layers
            else "  SQNR            (no layer quantized)",
            f"  model memory    {_size(self.model_bytes_before)} -> "
            f"{_size(self.model_bytes_after)} (parameters and buffers)",
            f"  on disk         {_size(self.disk_bytes)} "
            f"(model.safetensors {_size(self.weights_file_bytes)})",
        ]
        return "\n".join(lines)


def _size(num_bytes: int) -> str:
    if num_bytes >= 2**20:
        return f"{num_bytes / 2**20:.1f} MB"
    return f"{num_bytes / 2**10:.1f} KB"


def load_source(
    source: str | os.PathLike, options: loading.LoadOptions | None = None
) -> tuple[VisualChatModel, PreTrainedTokenizerBase]:
    """The embedded default ("embedded") or a VisualChat checkpoint folder (full or delta)."""
    options = options or loading.LoadOptions()
    if str(source) == EMBEDDED:
        return loading.load_embedded_default(options)
    if not loading.is_checkpoint(source):
        raise FileNotFoundError(
            f"{source} is not a VisualChat checkpoint folder (no {loading.CONFIG_NAME}); "
            f"use {EMBEDDED!r} for the embedded default"
        )
    return loading.load_pretrained(source, options)


def folder_bytes(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def quantize_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    fmt: str,
    lorc_rank: int = 0,
    skip: Sequence[str] = DEFAULT_SKIP,
    options: loading.LoadOptions | None = None,  # None: float32 on CPU
) -> ConversionReport:
    options = options or loading.LoadOptions(device="cpu")
    started = time.perf_counter()
    model, tokenizer = load_source(source, options)
    before = module_bytes(model)
    report = quantize_model(model, fmt, lorc_rank, skip)
    after = module_bytes(model)
    loading.save_pretrained(model, tokenizer, output)
    return ConversionReport(
        source=str(source),
        output=str(output),
        quantization=report,
        model_bytes_before=before,
        model_bytes_after=after,
        disk_bytes=folder_bytes(output),
        weights_file_bytes=(Path(output) / loading.WEIGHTS_NAME).stat().st_size,
        seconds=time.perf_counter() - started,
    )
