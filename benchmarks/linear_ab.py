"""Decode steps with torch's own linear layers against the engine's `linear` kernel (stacked
q/k/v and gate/up through serving/engine/linear_kernels.py), interleaved step by step.

Two engines over copies of the embedded default take turns: each decodes the same requests and
each step of one is followed by a step of the other, so a slow moment of a shared machine falls
on both. Printed: the median step of each, per number of running sequences.

    python benchmarks/linear_ab.py [--sequences 1,16] [--steps 100] [--rounds 3] [--out r.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

from serving.bench import workloads as wl
from serving.engine import Engine, EngineConfig
from visualchat.atomic import atomic_write_json
from visualchat.model import loading
from visualchat.sampling import SamplingParams

VARIANTS = {"torch_layers": None, "engine_linear": "linear"}


def interleaved_steps(engines: dict[str, Engine], sequences: int, steps: int, rounds: int):
    """Median decode-step seconds of each engine, the engines stepping in turns."""
    chats = wl.image_chats(sequences, 5)
    times: dict[str, list[float]] = {name: [] for name in engines}
    params = SamplingParams(max_tokens=steps + 20, ignore_eos=True)
    for _ in range(rounds):
        for engine in engines.values():
            for chat in chats:
                engine.add_request(engine.process(chat), params)
            while any(r.is_prefill for r in engine.requests.values()):
                engine.step()  # prompts first: only decode steps are timed
        for _ in range(steps):
            for name, engine in engines.items():
                started = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - started)
        for engine in engines.values():
            while engine.has_unfinished_requests():
                engine.step()
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", default="1,16")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    model, tokenizer = loading.load_embedded_default(loading.LoadOptions())
    engines = {
        name: Engine(
            copy.deepcopy(model),
            tokenizer,
            EngineConfig(linear_kernels=kernels, max_num_batched_tokens=512),
        )
        for name, kernels in VARIANTS.items()
    }
    results = {}
    for sequences in (int(n) for n in args.sequences.split(",")):
        medians = interleaved_steps(engines, sequences, args.steps, args.rounds)
        results[str(sequences)] = medians
        ratio = medians["engine_linear"] / medians["torch_layers"]
        print(
            f"{sequences:3d} sequences: torch's layers {1e3 * medians['torch_layers']:.1f} ms, "
            f"engine linear {1e3 * medians['engine_linear']:.1f} ms ({ratio:.3f}x)"
        )
    if args.out is not None:
        atomic_write_json(args.out, {"step_seconds_median": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
