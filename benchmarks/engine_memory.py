"""Memory of an engine on the embedded default after start-up: the process's resident set now,
its peak so far (start-up times every kernel, so every kernel's copy of the weights exists for a
while), and what the chosen kernels keep (oneDNN's packed copies, the block forms).

    python benchmarks/engine_memory.py [--no-block-kernels] [--out r.json]

One engine per process: the peak is the process's own.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys

from serving.engine import Engine, EngineConfig
from visualchat.atomic import atomic_write_json
from visualchat.model import loading


def resident_mib() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-block-kernels", action="store_true", help="float32 weights only")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    model, tokenizer = loading.load_embedded_default(loading.LoadOptions())
    engine = Engine(model, tokenizer, EngineConfig(block_kernels=not args.no_block_kernels))
    gc.collect()
    linears = engine.runner.linears
    results = {
        "block_kernels": not args.no_block_kernels,
        "kernels_by_rows": {str(r): k for r, k in linears.choice.by_rows.items()},
        "resident_mib": resident_mib(),
        "peak_resident_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "packed_mib": linears.packed_bytes / 2**20,
        "block_mib": linears.block_bytes / 2**20,
    }
    print(
        f"kernels {results['kernels_by_rows']}: resident {results['resident_mib']} MiB "
        f"(peak {results['peak_resident_mib']}), packed copies {results['packed_mib']:.0f} MiB, "
        f"blocks {results['block_mib']:.0f} MiB"
    )
    if args.out is not None:
        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
