"""Decode steps of engine variants, interleaved step by step: the engine's own forward of
Llama-family backbones against transformers' forward (serving/engine/lean_forward.py), and
torch's own linear layers against the engine's `linear` kernel (stacked q/k/v and gate/up through
serving/engine/linear_kernels.py).

Engines over copies of the embedded default take turns: each decodes the same requests and each
step of one is followed by a step of the others, so a slow moment of a shared machine falls on
all. Printed: the median step of each and its ratio to the first, per number of running
sequences.

    python benchmarks/engine_ab.py [--variants lean,transformers] [--sequences 1,16]
        [--steps 100] [--rounds 3] [--words N | --mixed-words N] [--out r.json]

The requests are the batching bench's image chats (~47 prompt tokens each), or with --words N
text prompts of N words (N=1500 is ~1,520 tokens): long contexts, where attention's share of a
step grows.

Variants: lean (the default engine), lean_linear (the same, torch's `linear` at every pass
size instead of the kernels chosen at start-up), transformers (transformers' forward),
torch_layers (transformers' forward, torch's own layers), engine_linear (transformers' forward
through the engine's `linear` kernel), lean_gather (the default engine without the decode
mirror: every decode group gathered from the paged cache in every layer, see
serving/engine/decode_mirror.py), lean_float (the default engine on float32 weights only: no
block kernels, see serving/engine/block_kernels.py), no_native (the default engine with its
decode-only passes through the lean forward instead of the native decode pass, see
serving/engine/native_decode.py), no_native_attention (the default engine with the decode groups
of its other passes gathered for SDPA, or read from the decode mirror, instead of attending
natively from the slots, see serving/engine/paged_attention.py).

With --mixed-words N the first sequence is a text prompt of N words and the rest image chats: a
busy server's mix of one long context among short ones.
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

VARIANTS: dict[str, dict] = {  # EngineConfig fields of each variant
    "lean": {},
    "lean_linear": {"linear_kernels": "linear"},
    "transformers": {"lean_forward": False},
    "torch_layers": {"lean_forward": False, "linear_kernels": None},
    "engine_linear": {"lean_forward": False, "linear_kernels": "linear"},
    "lean_gather": {"decode_mirror_tokens": 0},
    "lean_float": {"block_kernels": False},
    "no_native": {"native_decode": False},
    "no_native_attention": {"native_attention": False},
}


def variant_engines(names: list[str], budget: int) -> dict[str, Engine]:
    """An engine per variant, each over its own copy of the embedded default."""
    model, tokenizer = loading.load_embedded_default(loading.LoadOptions())
    return {
        name: Engine(
            copy.deepcopy(model),
            tokenizer,
            EngineConfig(max_num_batched_tokens=budget, **VARIANTS[name]),
        )
        for name in names
    }


def interleaved_steps(
    engines: dict[str, Engine],
    sequences: int,
    steps: int,
    rounds: int,
    words: int = 0,
    mixed_words: int = 0,
):
    """Median decode-step seconds of each engine, the engines stepping in turns."""
    chats = (
        [wl.long_prompt_chat(words, seed) for seed in range(sequences)]
        if words
        else wl.image_chats(sequences, 5)
    )
    if mixed_words:
        chats[0] = wl.long_prompt_chat(mixed_words, 0)
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
    parser.add_argument("--variants", default="lean,transformers", help=f"of {list(VARIANTS)}")
    parser.add_argument("--sequences", default="1,16")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--words", type=int, default=0, help="text prompts of this many words")
    parser.add_argument(
        "--mixed-words", type=int, default=0, help="only the first prompt: text of this many words"
    )
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown or len(names) < 2:
        parser.error(f"need two or more variants of {list(VARIANTS)}, got {args.variants!r}")
    engines = variant_engines(names, budget=512)
    results = {}
    for sequences in (int(n) for n in args.sequences.split(",")):
        medians = interleaved_steps(
            engines, sequences, args.steps, args.rounds, args.words, args.mixed_words
        )
        results[str(sequences)] = medians
        first = medians[names[0]]
        print(
            f"{sequences:3d} sequences: "
            + ", ".join(
                f"{name} {1e3 * medians[name]:.1f} ms ({medians[name] / first:.3f}x)"
                for name in names
            )
        )
    if args.out is not None:
        atomic_write_json(
            args.out,
            {
                "variants": names,
                "words": args.words,
                "mixed_words": args.mixed_words,
                "step_seconds_median": results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
