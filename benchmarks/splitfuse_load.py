"""SplitFuse under rising load: chunking on versus off at several arrival rates, in one process.

Unchunked, a long prefill stalls every stream decoding at that moment for the whole prefill
(~2 s for ~1,050 tokens on the 2-core CPU). p95 inter-token latency sees those stalls only once
they are more than 5% of all gaps. Per request, the stalls it meets are the prefills that start
during its life, so their share of its gaps grows with the arrival rate and sharply as the
prefills approach saturating the machine: about r * s / (1 - r * P) for r requests/s, a decode
step of s seconds and a prefill of P (FastGen's own workload: s ~0.07, P ~2.2, so ~5% near
0.27 requests/s). This runs the bench's SplitFuse part (`serving.bench.run`, the same engine
with chunking on and off) at each rate on the same model load and writes every rate's summary,
a table and a plot of the inter-token percentiles against the rate.

    python benchmarks/splitfuse_load.py --workload fastgen --rates 0.2,0.3,0.4 --requests 24 \
        --out-dir benchmarks/results/splitfuse_load

`--rounds 2` runs on, off, then off, on at each rate (the machine's speed drifts between
minutes); each mode pools its rounds, and each round's own p95 ratio is printed too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from serving.bench.run import SPLITFUSE_WORKLOADS, BenchConfig, splitfuse_comparison
from visualchat.api import VisualChat
from visualchat.atomic import atomic_save_figure, atomic_write_json


def sweep(cfg: BenchConfig, rates: list[float], num_requests: int) -> list[dict[str, Any]]:
    """One SplitFuse comparison per rate (requests/s), each with `num_requests` long prompts."""
    vc = VisualChat.from_pretrained(cfg.model)
    points = []
    for rate in rates:
        torch.manual_seed(cfg.seed)
        at_rate = cfg.with_splitfuse_load(rate, num_requests)
        result = splitfuse_comparison(vc.model, vc.tokenizer, at_rate)
        on, off = result["chunked"], result["unchunked"]
        points.append(
            {
                "rate": rate,
                "budget": on["budget"],
                "p95_ratio": result["p95_itl_ratio_chunked_vs_unchunked"],
                "rounds": result["rounds"],
                "on": on,
                "off": off,
            }
        )
        print(format_row(points[-1]), flush=True)
    return points


def format_row(point: dict[str, Any]) -> str:
    on, off = point["on"], point["off"]

    def ttft(m: dict) -> dict:  # the long prompts' own where streams run beside them
        return m.get("long_prompt_ttft_s", m["ttft_s"])

    def itl(m: dict) -> str:
        return "/".join(f"{m['inter_token_s'][k]:.3f}" for k in ("p50", "p95", "p99"))

    per_round = ""
    if len(point.get("rounds", [])) > 1:
        per_round = (
            " (rounds " + ", ".join(f"{r['p95_itl_ratio']:.2f}" for r in point["rounds"]) + ")"
        )
    return (
        f"{point['rate']:5.2f} req/s  ITL p50/p95/p99 on {itl(on)}  off {itl(off)}  "
        f"p95 on/off {point['p95_ratio']:.2f}{per_round}  stalls on/off {on['stalled_gap_fraction']:.1%}/"
        f"{off['stalled_gap_fraction']:.1%} of {off['num_inter_token_gaps']}  "
        f"TTFT p50 on/off {ttft(on)['p50']:.1f}/{ttft(off)['p50']:.1f} s  "
        f"effective req/s on/off {on['effective_throughput_req_s']:.3f}/"
        f"{off['effective_throughput_req_s']:.3f}"
    )


def plot(points: list[dict[str, Any]], path: Path, workload: str) -> None:
    """p95 and p99 inter-token latency against the arrival rate, chunking on and off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [p["rate"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("on", "-"), ("off", "--")):
        for q, marker in (("p95", "o"), ("p99", "s")):
            values = [p[mode]["inter_token_s"][q] for p in points]
            ax.plot(rates, values, marker + style, label=f"{q}, chunking {mode}")
    ax.set_yscale("log")
    ax.set_xlabel("long-prompt arrivals per second (Poisson)")
    ax.set_ylabel("inter-token latency (s)")
    ax.set_title(f"SplitFuse on vs off, '{workload}' workload, embedded model, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: embedded)")
    parser.add_argument("--workload", choices=SPLITFUSE_WORKLOADS, default="fastgen")
    parser.add_argument("--rates", default="0.2,0.3,0.4", help="arrivals per second, comma list")
    parser.add_argument("--requests", type=int, default=24, help="long prompts per rate")
    parser.add_argument("--budget", type=int, default=None, help="default: the engine's pick")
    parser.add_argument("--prompt-words", type=int, default=1000, help="~1,050 prompt tokens")
    parser.add_argument("--tokens", type=int, default=64, help="reply tokens (fastgen workload)")
    parser.add_argument(
        "--streams", type=int, default=None, help="streams decoding (mixed workload; default 32)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of on and off taking turns at each rate (on, off, off, on, ...; default 1)",
    )
    parser.add_argument("--out-dir", default="benchmarks/results/splitfuse_load")
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates must be numbers separated by commas, got {args.rates!r}")
    if not rates or any(r <= 0 for r in rates):
        parser.error("--rates must hold at least one positive rate")
    if min(args.requests, args.prompt_words, args.tokens, args.rounds) < 1:
        parser.error("--requests, --prompt-words, --tokens and --rounds must be positive")
    if args.streams is not None and args.streams < 0:
        parser.error("--streams must be non-negative")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(
        model=args.model,
        out_dir=str(out_dir),
        splitfuse_workload=args.workload,
        splitfuse_budget=args.budget,
        long_prompt_words=args.prompt_words,
        fastgen_tokens=args.tokens,
        splitfuse_rounds=args.rounds,
    )
    if args.streams is not None:
        cfg.num_streams = args.streams
    points = sweep(cfg, rates, args.requests)
    plot(points, out_dir / "splitfuse_load.png", args.workload)
    atomic_write_json(
        out_dir / "splitfuse_load.json",
        {
            "workload": args.workload,
            "requests_per_rate": args.requests,
            "threads": torch.get_num_threads(),
            "config": cfg.__dict__,
            "points": points,
        },
    )
    print(f"wrote {out_dir / 'splitfuse_load.json'} and {out_dir / 'splitfuse_load.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
