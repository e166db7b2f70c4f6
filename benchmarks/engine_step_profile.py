"""Where does a decode step of the engine go? torch's profiler over timed decode steps of the
embedded default with N running sequences: the ops by self time, and the share of the linear
layers' products (`mm` through torch's `linear`, `bmm` through row blocks, oneDNN's packed
inner product, whichever kernels the engine chose on this machine).

    python benchmarks/engine_step_profile.py [--sequences 1] [--steps 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from torch.profiler import ProfilerActivity, profile

from serving.bench import workloads as wl
from serving.engine import Engine, EngineConfig
from visualchat.atomic import atomic_write_json
from visualchat.sampling import SamplingParams

LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::bmm", "mkldnn::_linear_pointwise")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1, help="running sequences")
    parser.add_argument("--steps", type=int, default=20, help="profiled decode steps")
    parser.add_argument("--kernels", default="auto", help="EngineConfig.linear_kernels")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    engine = Engine.from_pretrained(
        config=EngineConfig(max_num_batched_tokens=256, linear_kernels=args.kernels)
    )
    inputs = [engine.process(c) for c in wl.image_chats(args.sequences, 0)]
    params = SamplingParams(max_tokens=2 * args.steps + 32, ignore_eos=True)
    ids = [engine.add_request(x, params) for x in inputs]
    while any(engine.requests[i].is_prefill for i in ids):
        engine.step()  # prompts first: only decode steps are profiled
    times = []
    for _ in range(args.steps):  # timed without the profiler
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)  # microseconds
    linear = sum(e.self_cpu_time_total for e in events if e.key in LINEAR_OPS)
    step_ms = 1e3 * statistics.median(times)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    print(
        f"{args.sequences} sequence(s): decode step {step_ms:.1f} ms (median, unprofiled); "
        f"profiled: {total / 1e3 / args.steps:.1f} ms of op time per step, of which linear "
        f"products {linear / 1e3 / args.steps:.1f} ms ({100 * linear / total:.0f}%)"
    )
    if engine.runner.linears is not None:
        print(f"kernels by pass rows: {engine.runner.linears.choice.by_rows}")
    if args.out is not None:
        atomic_write_json(
            args.out,
            {
                "sequences": args.sequences,
                "step_ms_median": step_ms,
                "op_ms_per_step": total / 1e3 / args.steps,
                "linear_ms_per_step": linear / 1e3 / args.steps,
                "top_ops_ms_per_step": {
                    e.key: e.self_cpu_time_total / 1e3 / args.steps
                    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
                },
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
