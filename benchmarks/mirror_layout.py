"""Which layout the decode mirror keeps (serving/engine/decode_mirror.py): the time to gather a
decode group's keys from the paged cache into it, and SDPA's time to read it, per layout, over 30
layers of the embedded default's shapes (3 kv heads of 64, 3 query heads each).

Layouts: slot-major (b, room, kv_heads, d), the cache's own, one `index_select`; head-major
(b, kv_heads, room, d), a gather then a transposing copy; head-major written by one gather along
a permuted view of the cache. Medians of the rounds, the layouts taking turns.

    python benchmarks/mirror_layout.py [--sequences 16] [--positions 250] [--rounds 10]
        [--out r.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from visualchat.atomic import atomic_write_json

LAYERS, KV_HEADS, SHARED, HEAD_DIM, SLOTS = 30, 3, 3, 64, 16384


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--positions", type=int, default=250, help="cached positions each")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    b, k = args.sequences, args.positions
    room = k + 32
    torch.manual_seed(0)
    caches = [torch.randn(SLOTS, KV_HEADS, HEAD_DIM) for _ in range(LAYERS)]
    slots = torch.randint(0, SLOTS, (b * room,))
    query = torch.randn(b, KV_HEADS, SHARED, HEAD_DIM)
    mask = torch.zeros(b, 1, SHARED, k)

    def gather(layout: str, cache: torch.Tensor) -> torch.Tensor:
        """(b, kv_heads, k, d) view of the group's keys, gathered into `layout`."""
        if layout == "slot_major":
            held = cache.index_select(0, slots).view(b, room, KV_HEADS, HEAD_DIM)
            return held[:, :k].transpose(1, 2)
        if layout == "head_major_copy":
            held = cache.index_select(0, slots).view(b, room, KV_HEADS, HEAD_DIM)
            return held.transpose(1, 2).contiguous()[:, :, :k]
        held = cache.transpose(0, 1).index_select(1, slots)  # (kv_heads, b * room, d)
        return held.view(KV_HEADS, b, room, HEAD_DIM)[:, :, :k].transpose(0, 1)

    layouts = ("slot_major", "head_major_copy", "head_major_permuted")
    held = {layout: [gather(layout, c) for c in caches] for layout in layouts}
    timings: dict[str, dict[str, list[float]]] = {
        what: {layout: [] for layout in layouts} for what in ("gather", "sdpa")
    }
    for round_ in range(args.rounds + 1):
        for layout in layouts:
            started = time.perf_counter()
            for cache in caches:
                gather(layout, cache)
            gathered = time.perf_counter() - started
            started = time.perf_counter()
            for keys in held[layout]:  # the keys stand in for the values too
                F.scaled_dot_product_attention(query, keys, keys, attn_mask=mask, scale=0.125)
            read = time.perf_counter() - started
            if round_:  # the first round warms up
                timings["gather"][layout].append(gathered)
                timings["sdpa"][layout].append(read)
    results = {
        what: {layout: 1e3 * statistics.median(t) for layout, t in by.items()}
        for what, by in timings.items()
    }
    for what, by in results.items():
        print(f"{what} ({LAYERS} layers): " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in by.items()))
    if args.out is not None:
        atomic_write_json(args.out, {"sequences": b, "positions": k, "ms_median": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
