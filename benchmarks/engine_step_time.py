"""How does one decode step of the engine cost with the number of running sequences?

Continuous batching beats a static batch only as far as a step with fewer live sequences is
cheaper; this measures that curve on the embedded default (median of timed decode steps after
the prompts are in) through transformers' forward with torch's own linear layers, with each of
the engine's linear kernels (serving/engine/linear_kernels.py) and with its start-up choice
("auto"), then the default engine (its own forward, serving/engine/lean_forward.py), and the
language-model head's matrix-vector product four ways, since on a CPU that single 49152 x 576
product is a large share of a one-sequence step.

    python benchmarks/engine_step_time.py [--batches 1,2,4,8,16] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from serving.bench import workloads as wl
from serving.engine import Engine, EngineConfig
from serving.engine.linear_kernels import KERNELS
from visualchat.atomic import atomic_write_json
from visualchat.sampling import SamplingParams


def decode_step_seconds(engine: Engine, inputs: list, batch: int, steps: int) -> float:
    """Median wall time of `steps` engine steps while `batch` sequences decode."""
    params = SamplingParams(max_tokens=steps + 16, ignore_eos=True)
    ids = [engine.add_request(x, params) for x in inputs[:batch]]
    while any(engine.requests[i].is_prefill for i in ids):
        engine.step()  # prompts first: only decode steps are timed
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    for request_id in ids:
        engine.abort(request_id)
    return statistics.median(times)


def head_product_seconds(weight: torch.Tensor, repeats: int = 50) -> dict[str, float]:
    """One token's (1, hidden) x (vocab, hidden)^T, as F.linear does it, against a transposed
    contiguous copy, the engine's blocks of output rows (one bmm, a block per thread) and
    bfloat16 weights (the last changes the numbers, the others only the summation order)."""
    x = torch.randn(1, weight.shape[1])
    transposed = weight.t().contiguous()  # (hidden, vocab)
    parts = torch.get_num_threads()
    rows = weight.shape[0] // parts * parts
    blocks = weight[:rows].view(parts, -1, weight.shape[1])  # (parts, vocab / parts, hidden)
    columns = x.t().unsqueeze(0).expand(parts, -1, -1)  # (parts, hidden, 1)
    weight_bf16, x_bf16 = weight.bfloat16(), x.bfloat16()
    variants = {
        "linear_fp32": lambda: torch.nn.functional.linear(x, weight),
        "transposed_fp32": lambda: x @ transposed,
        "row_blocks_fp32": lambda: torch.bmm(blocks, columns),
        "linear_bf16": lambda: torch.nn.functional.linear(x_bf16, weight_bf16),
    }
    results = {}
    for name, run in variants.items():
        for _ in range(5):
            run()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        results[name] = statistics.median(times)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per batch")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    steps: dict[str, dict[int, float]] = {}
    variants = {  # name: (linear kernels, the engine's own forward)
        "torch_layers": (None, False),
        **{k: (k, False) for k in (*KERNELS, "auto")},
        "lean": ("auto", True),
    }
    auto_choice, auto_seconds = {}, {}
    for name, (kernels, lean) in variants.items():
        engine = Engine.from_pretrained(
            config=EngineConfig(linear_kernels=kernels, lean_forward=lean)
        )
        inputs = [engine.process(c) for c in wl.image_chats(max(batches), 0)]
        steps[name] = {b: decode_step_seconds(engine, inputs, b, args.steps) for b in batches}
        if name == "auto":
            linears = engine.runner.linears
            auto_choice = {str(r): k for r, k in linears.choice.by_rows.items()}
            auto_seconds = {str(r): by for r, by in linears.seconds.items()}
        engine.close()  # hands the model back: its own layers and weight storages
    head = head_product_seconds(engine.model.language_model.get_output_embeddings().weight.data)
    print("decode step (ms) by running sequences")
    print(f"{'sequences':>9} | " + " | ".join(f"{name:>12}" for name in steps))
    for b in batches:
        print(f"{b:9d} | " + " | ".join(f"{1e3 * steps[n][b]:12.1f}" for n in steps))
    print(f"auto's choice by pass rows: {auto_choice}")
    print("LM head, one token: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in head.items()))
    if args.out is not None:
        atomic_write_json(
            args.out,
            {
                "threads": torch.get_num_threads(),
                "auto_choice": auto_choice,
                "auto_pass_seconds": auto_seconds,
                "decode_step_s": {
                    name: {str(b): s for b, s in curve.items()} for name, curve in steps.items()
                },
                "lm_head_s": head,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
