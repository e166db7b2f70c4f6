"""`visualchat bench quant`: what each weight format costs in quality, memory and speed.

For the full-precision model and every format with and without LoRC: stored bytes of the
quantized linear weights against bf16, per-layer SQNR (median and minimum over layers),
perplexity on a fixed slice of an offline English text (see `quality.py`), held-out accuracy
when an evaluator is given, and the reference decoder's decode speed.

Perplexity and accuracy run with the decoded weights kept between forwards
(`dequantized_weights`): the same outputs as the packed path, without decoding every layer
on every forward. Decode speed is measured on the packed path itself, so it includes the
per-forward dequantization that a CPU pays for the memory saving.

The accuracy evaluator comes from the caller (the CLI wires `training.evaluate`), which keeps
this library free of the training package.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from visualchat.api import VisualChat
from visualchat.atomic import atomic_write_json
from visualchat.model import loading
from visualchat.model.modeling import VisualChatModel
from visualchat.quant.convert import EMBEDDED, load_source
from visualchat.quant.formats import FORMAT_NAMES, get_format
from visualchat.quant.model import (
    QuantizationReport,
    dequantized_weights,
    quantizable_linears,
    quantize_model,
)
from visualchat.quant.quality import (
    TEXT_SOURCE,
    decode_tokens_per_second,
    perplexity,
    reference_token_ids,
    token_digest,
)

logger = logging.getLogger(__name__)

Evaluator = Callable[[VisualChat], dict[str, Any]]  # a VisualChat -> {"overall": {...}, ...}


@dataclass
class QuantBenchConfig:
    model: str | None = None  # checkpoint folder; None: the embedded default
    formats: tuple[str, ...] = FORMAT_NAMES
    lorc_rank: int = 8  # the LoRC rows' rank; 0: no LoRC rows
    max_text_tokens: int = 4096  # tokens of the reference text scored
    window: int = 512  # perplexity window (tokens)
    stride: int = 512  # window step; == window: disjoint windows
    decode_tokens: int = 32  # tokens generated for the decode-speed measure
    skip_accuracy: bool = False
    out: str = "benchmarks/results/quant.json"

    def __post_init__(self) -> None:
        for fmt in self.formats:
            get_format(fmt)
        if self.lorc_rank < 0:
            raise ValueError(f"lorc_rank must be >= 0, got {self.lorc_rank}")
        if self.max_text_tokens < 2:
            raise ValueError(f"max_text_tokens must be at least 2, got {self.max_text_tokens}")
        if not 0 < self.stride <= self.window:
            raise ValueError(f"need 0 < stride <= window, got {self.stride} and {self.window}")
        if self.decode_tokens < 2:
            raise ValueError(f"decode_tokens must be at least 2, got {self.decode_tokens}")


@dataclass
class VariantResult:
    name: str  # "float32 (reference)", "fp6_e3m2", "fp6_e3m2+lorc8", ...
    format: str | None  # None for the reference
    lorc_rank: int
    linear_bytes: int  # quantized linears as stored (the reference: float32)
    linear_bytes_bf16: int  # the same linears in bf16
    sqnr_db_median: float | None  # over layers; None for the reference
    sqnr_db_min: float | None
    perplexity: float
    accuracy: dict[str, Any] | None  # the evaluator's summary; None when skipped
    decode_tok_s: float
    seconds: dict[str, float] = field(default_factory=dict)  # per phase

    @property
    def ratio_vs_bf16(self) -> float:
        return self.linear_bytes / self.linear_bytes_bf16


def _measure(
    name: str,
    model: VisualChatModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: torch.Tensor,  # (n,) the scored text
    config: QuantBenchConfig,
    evaluate: Evaluator | None,
    report: QuantizationReport | None = None,  # None: the full-precision reference
) -> VariantResult:
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    with dequantized_weights(model):
        ppl = perplexity(model, token_ids, config.window, config.stride)
        seconds["perplexity"] = time.perf_counter() - started
        accuracy = None
        if evaluate is not None:
            started = time.perf_counter()
            accuracy = evaluate(VisualChat(model, tokenizer))
            seconds["accuracy"] = time.perf_counter() - started
    started = time.perf_counter()
    rate = decode_tokens_per_second(model, tokenizer, config.decode_tokens)
    seconds["decode"] = time.perf_counter() - started
    if report is None:  # the full-precision reference
        linears = quantizable_linears(model)
        numel = sum(m.weight.numel() for _, m in linears)
        linear_bytes = sum(m.weight.numel() * m.weight.element_size() for _, m in linears)
        return VariantResult(
            name, None, 0, linear_bytes, 2 * numel, None, None, ppl, accuracy, rate, seconds
        )
    return VariantResult(
        name=name,
        format=report.fmt,
        lorc_rank=report.lorc_rank,
        linear_bytes=report.num_bytes,
        linear_bytes_bf16=report.num_bytes_bf16,
        sqnr_db_median=report.median_sqnr_db,
        sqnr_db_min=report.min_sqnr_db,
        perplexity=ppl,
        accuracy=accuracy,
        decode_tok_s=rate,
        seconds=seconds,
    )


def run_quant_bench(
    config: QuantBenchConfig,
    evaluate: Evaluator | None = None,
    accuracy_note: str | None = None,  # why accuracy is missing, recorded in the JSON
    on_result: Callable[[VariantResult], None] | None = None,  # progress: called per variant
) -> dict[str, Any]:
    """Measure every variant, write the JSON atomically to config.out, return the results."""
    started = time.perf_counter()
    if config.skip_accuracy:
        evaluate, accuracy_note = None, "skipped (--skip-accuracy)"
    elif evaluate is None and accuracy_note is None:
        accuracy_note = "no evaluator given"
    base, tokenizer = load_source(
        config.model or EMBEDDED, loading.LoadOptions(device="cpu", dtype="float32")
    )
    token_ids = reference_token_ids(tokenizer, config.max_text_tokens)
    results: list[VariantResult] = []

    def record(result: VariantResult) -> None:
        results.append(result)
        logger.info("%s: %s", result.name, result)
        if on_result is not None:
            on_result(result)

    record(_measure("float32 (reference)", base, tokenizer, token_ids, config, evaluate))
    ranks = [0] + ([config.lorc_rank] if config.lorc_rank else [])
    for fmt in config.formats:
        for rank in ranks:
            variant = copy.deepcopy(base)
            quantize_started = time.perf_counter()
            report = quantize_model(variant, fmt, lorc_rank=rank)
            quantize_seconds = time.perf_counter() - quantize_started
            name = fmt if rank == 0 else f"{fmt}+lorc{rank}"
            result = _measure(name, variant, tokenizer, token_ids, config, evaluate, report)
            result.seconds["quantize"] = quantize_seconds
            del variant
            record(result)
    payload = {
        "model": config.model or EMBEDDED,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": asdict(config),
        "text": {
            "source": TEXT_SOURCE,
            "num_tokens": int(token_ids.numel()),
            "token_sha256_16": token_digest(token_ids),
            "window": config.window,
            "stride": config.stride,
        },
        "accuracy_note": accuracy_note,
        "notes": [
            "linear_bytes: packed codes + scales + zero points + LoRC factors of the quantized "
            "linears (the reference row: its float32 weights); ratio_vs_bf16 against the same "
            "linears in bf16",
            "perplexity and accuracy use the decoded weights kept between forwards (same "
            "outputs); decode_tok_s is the packed path, dequantizing every layer per forward",
        ],
        "variants": [result_dict(r) for r in results],
        "total_seconds": time.perf_counter() - started,
    }
    atomic_write_json(config.out, payload)
    payload["json"] = config.out
    return payload


def result_dict(result: VariantResult) -> dict[str, Any]:
    """A variant as it appears in the JSON (and as `format_row` takes it)."""
    return _jsonable({**asdict(result), "ratio_vs_bf16": result.ratio_vs_bf16})


def _jsonable(value: Any) -> Any:
    """inf/nan (a lossless layer's SQNR) become None: JSON has no infinities."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(variant: dict[str, Any]) -> str:
    accuracy = variant.get("accuracy")
    overall = (accuracy or {}).get("overall") or {}
    acc = f"{100 * overall['accuracy']:.1f}%" if "accuracy" in overall else "-"
    return (
        f"{variant['name']:<20} {variant['ratio_vs_bf16']:>7.3f} "
        f"{_fmt(variant['sqnr_db_median'], '.1f'):>8} {_fmt(variant['sqnr_db_min'], '.1f'):>8} "
        f"{variant['perplexity']:>9.3f} {acc:>8} {variant['decode_tok_s']:>9.1f}"
    )


TABLE_HEADER = (
    f"{'variant':<20} {'x bf16':>7} {'SQNR med':>8} {'SQNR min':>8} "
    f"{'ppl':>9} {'accuracy':>8} {'decode/s':>9}"
)


def format_context(results: dict[str, Any]) -> str:
    """What the table's numbers were measured on (printed under the table)."""
    text = results["text"]
    lines = [
        f"model {results['model']}, {results['threads']} CPU threads; perplexity on "
        f"{text['num_tokens']} tokens of {text['source']}, windows of {text['window']} "
        f"(stride {text['stride']}); x bf16 = stored bytes of the quantized linears / bf16",
    ]
    if results.get("accuracy_note"):
        lines.append(f"accuracy: {results['accuracy_note']}")
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    rows = [TABLE_HEADER, *(format_row(v) for v in results["variants"])]
    return "\n".join([*rows, format_context(results)])
