"""The batching bench's workload (16 image chats, fixed output lengths) through engine variants
that take turns, run after run, so that a slow phase of the shared machine falls on all.

`engine_ab.py` compares single decode steps; this compares whole runs of the workload, prompts
and changing batch sizes included. Printed: each variant's tokens/s per run, the medians and the
median of the per-run ratios to the first variant, and whether every run's tokens were the same.

    python benchmarks/batching_ab.py [--variants lean,lean_gather] [--scenario varied_length]
        [--runs 3] [--budget 256] [--out r.json]

Variants are `engine_ab.py`'s (EngineConfig fields).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from engine_ab import VARIANTS, variant_engines

from serving.bench import workloads as wl
from serving.bench.run import BenchConfig, batching_workload
from visualchat.atomic import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="lean,lean_gather", help=f"of {list(VARIANTS)}")
    parser.add_argument("--scenario", default="varied_length", help="same_length, varied_length")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget", type=int, default=256, help="tokens per pass")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    chats, scenarios = batching_workload(BenchConfig())
    if set(names) - set(VARIANTS) or len(names) < 2 or args.scenario not in scenarios:
        parser.error(f"need two or more variants of {list(VARIANTS)} and a known scenario")
    lengths = scenarios[args.scenario]
    engines = variant_engines(names, args.budget)
    warm_up = wl.image_chats(2, 1)
    for engine in engines.values():
        wl.run_engine(engine, warm_up, [4, 4])  # first-pass allocations, untimed
    tok_s: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, list] = {name: [] for name in names}
    for run in range(args.runs):
        for name, engine in engines.items():
            result = wl.run_engine(engine, chats, lengths)
            tok_s[name].append(result.tokens_per_second)
            tokens[name].append(result.token_ids)
            print(f"run {run}: {name} {result.tokens_per_second:.1f} tokens/s", flush=True)
    first = names[0]
    ratios = {
        name: statistics.median(a / b for a, b in zip(tok_s[name], tok_s[first], strict=True))
        for name in names
    }
    same_tokens = all(t == tokens[first][0] for runs in tokens.values() for t in runs)
    for name in names:
        print(
            f"{name}: median {statistics.median(tok_s[name]):.1f} tokens/s, "
            f"{ratios[name]:.3f}x {first} (median of per-run ratios)"
        )
    print(f"every run's tokens the same: {same_tokens}")
    if args.out is not None:
        atomic_write_json(
            args.out,
            {
                "scenario": args.scenario,
                "budget": args.budget,
                "lengths": lengths,
                "tokens_per_second": tok_s,
                "ratio_to_first_median": ratios,
                "same_tokens": same_tokens,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
