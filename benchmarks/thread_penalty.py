"""How much slower does the engine decode when stepped on a second thread, as EngineLoop does?

On a 2-core CPU, once two threads have run OpenMP work, libgomp manages more threads than there
are cores and stops spinning between parallel regions, so every parallel op waits for its worker
to wake. This decodes one stream (the single-stream request of `visualchat bench serving`) with
the engine stepped on a second thread, after the main thread loaded the model either with the
default thread count (what `visualchat serve` does now) or with one thread (so the main thread
never starts an OpenMP team). Run it twice, once per mode: the mode must be set before torch
does any work.

    python benchmarks/thread_penalty.py [--main-single-threaded] [--out result.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main-single-threaded", action="store_true")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the result here (JSON)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.main_single_threaded:
        torch.set_num_threads(1)  # before any torch work on this (the main) thread

    from serving.bench import workloads as wl
    from serving.engine import Engine, EngineConfig
    from visualchat.api import VisualChat
    from visualchat.atomic import atomic_write_json

    vc = VisualChat.from_pretrained(None)  # loaded on the main thread
    chat = wl.image_chats(1, 99)[0]
    rates: list[float] = []

    def on_second_thread() -> None:
        torch.set_num_threads(threads)
        engine = Engine(vc.model, vc.tokenizer, EngineConfig(max_num_batched_tokens=64))
        inputs = engine.process(chat)
        for _ in range(args.repeats):
            rates.append(wl.direct_decode_rate(engine, inputs, args.tokens))
        engine.close()

    worker = threading.Thread(target=on_second_thread)
    worker.start()
    worker.join()
    mode = "main thread single-threaded" if args.main_single_threaded else "default"
    print(
        f"{mode}: decode on a second thread {statistics.median(rates):.1f} tokens/s "
        f"(runs: {', '.join(f'{r:.1f}' for r in rates)})"
    )
    if args.out is not None:
        atomic_write_json(args.out, {"mode": mode, "threads": threads, "decode_tok_s": rates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
