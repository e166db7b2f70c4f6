"""MKL's packed sgemm against the engine's kernels, a pass over every weight product at a few row
counts: why the engine does not use it (serving/engine/linear_kernels.py).

`torch.ops.mkl._mkl_linear` multiplies through a copy of the weight packed by MKL for one exact
row count, and runs plain `linear` for any other. Timed here per pass over the embedded
default's 30 layers of products (q/k/v and gate/up stacked, as the engine runs them; distinct
random weights per layer, 425 MB, so the pass reads memory as a real one does): torch's
`linear`, oneDNN's packed product ("packed"), MKL's packed for each count in --packs, called
with exactly that many rows, or with fewer rows padded up to it through a persistent buffer.
The kernels take turns per round; medians of the rounds.

    python benchmarks/mkl_packed_pass.py [--rows 1,4,8,12,16] [--packs 8,16] [--rounds 10]
        [--out r.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from visualchat.atomic import atomic_write_json

# (out, in) of the stacked q/k/v, o, stacked gate/up and down products of SmolLM2-135M
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LAYERS = 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,12,16")
    parser.add_argument("--packs", default="8,16", help="row counts MKL packs for")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    packs = [int(p) for p in args.packs.split(",")]
    torch.manual_seed(0)
    weights = [0.02 * torch.randn(o, i) for _ in range(LAYERS) for o, i in SHAPES]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    mkl = {p: [torch.ops.mkl._mkl_reorder_linear_weight(w, p) for w in weights] for p in packs}
    buffers = {(p, i): torch.zeros(p, i) for p in packs for _, i in SHAPES}

    def mkl_product(x: torch.Tensor, pack: int, packed: torch.Tensor, w: torch.Tensor):
        if x.shape[0] == pack:
            return torch.ops.mkl._mkl_linear(x, packed, w, None, pack)
        padded = buffers[(pack, x.shape[1])]  # rows past x's hold earlier inputs: discarded
        padded[: x.shape[0]].copy_(x)
        return torch.ops.mkl._mkl_linear(padded, packed, w, None, pack)[: x.shape[0]]

    def run_pass(kernel: str, xs: list[torch.Tensor]) -> None:
        """Every product of the pass by `kernel`: linear, packed or mkl_<rows packed for>."""
        for x, w, packed in zip(xs, weights, onednn, strict=True):
            if kernel == "linear":
                torch.nn.functional.linear(x, w)
            elif kernel == "packed":
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        if kernel.startswith("mkl_"):
            pack = int(kernel.removeprefix("mkl_"))
            for x, w, packed in zip(xs, weights, mkl[pack], strict=True):
                mkl_product(x, pack, packed, w)

    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, w.shape[1]) for w in weights]
            kernels = ["linear", "packed", *(f"mkl_{p}" for p in packs if p >= rows)]
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for round_ in range(args.rounds + 1):
                for kernel in kernels:
                    started = time.perf_counter()
                    run_pass(kernel, xs)
                    if round_:  # the first round warms up
                        times[kernel].append(time.perf_counter() - started)
            results[str(rows)] = {n: 1e3 * statistics.median(t) for n, t in times.items()}
            print(
                f"{rows:3d} rows: "
                + ", ".join(f"{n} {ms:.1f} ms" for n, ms in results[str(rows)].items()),
                flush=True,
            )
    if args.out is not None:
        atomic_write_json(args.out, {"ms_per_pass_median": results, "packs": packs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
