"""Which token budget serves the batching workload fastest, and where does the time go?

The engine picks its budget from a latency target (a 250 ms pass, so that decoding streams are
not held up by prompt chunks); on the 2-core CPU that is 64 tokens. The batching benchmark
(16 image chats arriving at once) is about throughput instead: small passes spend more on
prompts (a fused pass of 64 rows multiplies at a lower rate than one of 256 and reads every
weight again). This runs the batching workload of `visualchat bench serving` through the
engine alone at several budgets, both scenarios, and splits each run's time into passes that
carry prompt tokens and decode-only passes.

    python benchmarks/batching_budget.py [--budgets 64,128,256,512,1024] [--repeats 2] [--out f.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from serving.bench.run import BenchConfig, batching_workload
from serving.engine import Engine, EngineConfig
from visualchat.atomic import atomic_write_json
from visualchat.sampling import SamplingParams


def timed_run(engine: Engine, inputs: list, lengths: list[int]) -> dict[str, float]:
    """Every request added at once, stepped to the end; seconds by kind of pass."""
    for x, n in zip(inputs, lengths, strict=True):
        engine.add_request(x, SamplingParams(max_tokens=n, ignore_eos=True))
    prompt_s, decode_s, prompt_passes, decode_passes = 0.0, 0.0, 0, 0
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        # Decided before the pass: after it, prompts that finished have left prefill.
        with_prompt = any(r.is_prefill for r in engine.scheduler.running) or bool(
            engine.scheduler.waiting
        )
        step_started = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - step_started
        if with_prompt:
            prompt_s, prompt_passes = prompt_s + seconds, prompt_passes + 1
        else:
            decode_s, decode_passes = decode_s + seconds, decode_passes + 1
    total = time.perf_counter() - started
    return {
        "seconds": total,
        "tokens_per_s": sum(lengths) / total,
        "prompt_pass_s": prompt_s,
        "prompt_passes": prompt_passes,
        "decode_pass_s": decode_s,
        "decode_passes": decode_passes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="64,128,256,512,1024")
    parser.add_argument("--repeats", type=int, default=2, help="runs per budget; median kept")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    chats, scenarios = batching_workload(BenchConfig())  # the bench's own workload
    results: dict[str, dict[str, dict]] = {name: {} for name in scenarios}
    for budget in (int(b) for b in args.budgets.split(",")):
        engine = Engine.from_pretrained(config=EngineConfig(max_num_batched_tokens=budget))
        inputs = [engine.process(c) for c in chats]
        timed_run(engine, inputs[:2], [4, 4])  # warm-up: first-pass allocations
        for name, lengths in scenarios.items():
            runs = [timed_run(engine, inputs, lengths) for _ in range(args.repeats)]
            median = statistics.median(r["tokens_per_s"] for r in runs)
            kept = min(runs, key=lambda r: abs(r["tokens_per_s"] - median))
            results[name][str(budget)] = {
                **kept,
                "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
            }
            print(
                f"{name:13s} budget {budget:5d}: {kept['tokens_per_s']:6.1f} tokens/s "
                f"({kept['seconds']:.2f} s: {kept['prompt_passes']} passes with prompt tokens "
                f"{kept['prompt_pass_s']:.2f} s, {kept['decode_passes']} decode-only "
                f"{kept['decode_pass_s']:.2f} s)"
            )
        engine.close()
    if args.out is not None:
        atomic_write_json(args.out, {"threads": torch.get_num_threads(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
