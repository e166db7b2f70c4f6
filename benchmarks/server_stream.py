"""One stream through the real OpenAI-compatible server: decode tokens/s against the bandwidth bound.

`visualchat bench serving` measures the engine inside one process that also runs the baselines,
so its main thread keeps an OpenMP team alive while the EngineLoop thread steps (see
benchmarks/thread_penalty.py). A server is different: it loads its engines on a thread that ends
(or on the loop thread itself) and answers HTTP on threads that do little torch work. This
starts `visualchat serve` on the embedded default, streams one greedy request at a time with the
official `openai` client (`ignore_eos`, a fixed number of tokens), and times the gaps from the
first streamed chunk to the usage chunk, each paired with a read-bandwidth measurement taken in
this process just before (the machine's bandwidth moves; the median fraction is quoted).

The bound divides by the bytes a one-row step reads. Where the model's weights have block forms
(the embedded default's Q4_1 / Q8_0, serving/engine/block_weights.py) that is their bytes, as
the server's engine multiplies blocks at one row wherever they beat the float32 kernels (0.33x
their time on host B); the bound for the float32 weights is reported beside it.

    python benchmarks/server_stream.py [--tokens 96] [--rounds 5] [--port 8390] [--out r.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request

import torch
from openai import OpenAI

from serving.bench.run import read_bandwidth, weight_bytes_per_token
from serving.engine.linear_kernels import EngineLinears
from visualchat.api import VisualChat
from visualchat.atomic import atomic_write_json


def wait_ready(port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the server on port {port} was not ready in {timeout:.0f} s")


def stream_rate(client: OpenAI, tokens: int) -> float:
    first = last = None
    completion_tokens = 0
    stream = client.chat.completions.create(
        model="visualchat",
        messages=[{"role": "user", "content": "Tell me a long story about a river and a stone."}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and first is None:
            first = now
        if chunk.usage:
            completion_tokens, last = chunk.usage.completion_tokens, now
    if first is None or last is None or completion_tokens < 2:
        raise RuntimeError("the stream ended without text and usage")
    return (completion_tokens - 1) / (last - first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=8390)
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "visualchat.cli", "serve", "--port", str(args.port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rounds = []
    try:
        # The bytes a decode step reads, from the same model the server loads (then dropped):
        # in blocks where it has them (block kernels at every size), and in float32.
        language_model = VisualChat.from_pretrained(None).model.language_model
        float32_bytes = weight_bytes_per_token(language_model)
        linears = EngineLinears(language_model, torch.get_num_threads(), "blocks", give_back=False)
        weight_bytes = weight_bytes_per_token(language_model, linears)
        linears.release()
        del language_model, linears
        wait_ready(args.port)
        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
        stream_rate(client, 8)  # warm-up
        data = torch.ones(128 * 2**20, dtype=torch.float32)  # 512 MB
        for _ in range(args.rounds):
            bandwidth = read_bandwidth(data)
            bound = bandwidth / weight_bytes
            rate = stream_rate(client, args.tokens)
            rounds.append(
                {
                    "decode_tok_s": rate,
                    "bound_tok_s": bound,
                    "fraction": rate / bound,
                    "float32_bound_tok_s": bandwidth / float32_bytes,
                    "float32_fraction": rate * float32_bytes / bandwidth,
                }
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    fraction = statistics.median(r["fraction"] for r in rounds)
    rate = statistics.median(r["decode_tok_s"] for r in rounds)
    print(f"server, one stream: {rate:.1f} tokens/s, {fraction:.2f} of the bandwidth bound")
    for r in rounds:
        print(f"  {r['decode_tok_s']:.1f} of {r['bound_tok_s']:.1f} tokens/s ({r['fraction']:.2f})")
    if args.out is not None:
        atomic_write_json(
            args.out,
            {
                "decode_tok_s": rate,
                "fraction_of_bound": fraction,
                "weight_bytes": weight_bytes,
                "float32_weight_bytes": float32_bytes,
                "rounds": rounds,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
