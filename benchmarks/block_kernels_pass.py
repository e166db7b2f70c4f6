"""One pass over every weight product of the embedded default, per kernel and pass size: torch's
`linear` and oneDNN's "packed" over the float32 weights, against the block kernels over the
GGUF's own Q4_1 / Q8_0 blocks (serving/engine/block_kernels.py), the merged LoRA factors added
in the same call. The kernels take turns pass by pass, so a slow moment of the shared machine
falls on all of them; medians printed and written.

    python benchmarks/block_kernels_pass.py [--rows 1,4,8,16,32,64] [--passes 10] [--out r.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from serving.engine import Engine, EngineConfig
from serving.engine.linear_kernels import time_pass
from visualchat.atomic import atomic_write_json
from visualchat.model import loading

KERNELS = ("linear", "packed", "blocks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16,32,64")
    parser.add_argument("--passes", type=int, default=10, help="timed passes per kernel and size")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    model, tokenizer = loading.load_embedded_default(loading.LoadOptions())
    # "auto" keeps only the copies it chose; fixed "packed" then "blocks" engines would each
    # hold one kind, so the products of one engine get both made here.
    engine = Engine(model, tokenizer, EngineConfig(linear_kernels="blocks"))
    products = engine.runner.linears.products
    for product in products:
        product.pack()
    in_blocks = sum(p.block_weight is not None for p in products)
    float_bytes = sum(p.weight.numel() * p.weight.element_size() for p in products)
    block_bytes = sum(p.block_weight.num_bytes for p in products if p.block_weight is not None)
    print(
        f"{len(products)} products, {in_blocks} in block formats: "
        f"{float_bytes / 2**20:.0f} MiB float32, {block_bytes / 2**20:.0f} MiB of blocks and factors"
    )
    results = {}
    for rows in (int(r) for r in args.rows.split(",")):
        seconds: dict[str, list[float]] = {k: [] for k in KERNELS}
        for index in range(args.passes + 1):
            for kernel in KERNELS:
                elapsed = time_pass(products, kernel, rows)
                if index:  # the first pass of each is a warm-up
                    seconds[kernel].append(elapsed)
        medians = {k: statistics.median(v) for k, v in seconds.items()}
        results[str(rows)] = medians
        print(
            f"{rows:3d} rows: "
            + ", ".join(f"{k} {1e3 * s:.1f} ms" for k, s in medians.items())
            + f"; blocks / best float32 {medians['blocks'] / min(medians['linear'], medians['packed']):.2f}x"
        )
    if args.out is not None:
        atomic_write_json(
            args.out,
            {
                "products": len(products),
                "in_block_formats": in_blocks,
                "float32_bytes": float_bytes,
                "block_bytes": block_bytes,
                "pass_seconds_median": results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
