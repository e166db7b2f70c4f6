"""Reference-decoder benchmark on the embedded default: load time, single-stream decode speed
(against HF `generate()` on the same prompt), and peak memory.

    .venv/bin/python benchmarks/reference_decoder.py [--tokens 128] [--repeats 3] [--out FILE]

Each load is timed in a fresh subprocess (imports included), cold (empty conversion cache: the
GGUF file is de-quantized) and warm (converted safetensors cache). Decode speed is measured with
ignore_eos and a fixed length; medians are reported because this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOAD_SNIPPET = """
import time; t = time.perf_counter()
from visualchat import VisualChat
VisualChat.from_pretrained()
import resource
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def time_load(cache: str) -> tuple[float, float]:
    env = dict(os.environ, VISUALCHAT_CACHE=cache)
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True, text=True, check=True
    )
    seconds, rss_mb = out.stdout.split()[-2:]
    return float(seconds), float(rss_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/reference_decoder.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        cold_s, cold_rss = time_load(cache)
        warm = [time_load(cache) for _ in range(args.repeats)]
    warm_s = statistics.median(s for s, _ in warm)

    import torch
    from PIL import Image

    from visualchat import Conversation, SamplingParams, VisualChat
    from visualchat.model.generate import stream_tokens

    torch.manual_seed(0)
    vc = VisualChat.from_pretrained()
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    text = Conversation()
    text.add_user("Write a long story about a lighthouse keeper.")
    images = Conversation()
    images.add_user(
        "Compare image 1 and image 2.",
        [Image.new("RGB", (96, 96), "red"), Image.new("RGB", (96, 96), "blue")],
    )

    def decode_rate(conversation: Conversation) -> tuple[float, float, float]:
        rates, ttfts, e2e = [], [], []
        for _ in range(args.repeats):
            vc.image_cache = type(vc.image_cache)()  # encode images every time, as a new chat would
            started = time.perf_counter()
            first = None
            num = 0
            inputs = vc.process(conversation)
            feats = vc.image_cache.features(vc.model, inputs)
            for _event in stream_tokens(vc.model, vc.tokenizer, inputs, params, feats):
                num += 1
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            ttfts.append(first - started)
            rates.append((num - 1) / (end - first))
            e2e.append(num / (end - started))
        return statistics.median(rates), statistics.median(ttfts), statistics.median(e2e)

    text_rate, text_ttft, text_e2e = decode_rate(text)
    image_rate, image_ttft, _ = decode_rate(images)

    # Baseline: HF generate() on the same text prompt, same length, greedy, the bare backbone.
    prompt = vc.process(text).input_ids.unsqueeze(0)
    lm = vc.model.language_model
    vc.model.set_attention("causal")
    hf_rates = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            started = time.perf_counter()
            lm.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
            )
            hf_rates.append(args.tokens / (time.perf_counter() - started))
    vc.model.set_attention("mmca")
    hf_rate = statistics.median(hf_rates)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    results = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "load_cold_s": round(cold_s, 2),
        "load_warm_s": round(warm_s, 2),
        "load_cold_peak_rss_mb": round(cold_rss),
        "load_warm_peak_rss_mb": round(statistics.median(r for _, r in warm)),
        "decode_text_tok_s": round(text_rate, 1),
        "decode_2_images_tok_s": round(image_rate, 1),
        "ttft_text_s": round(text_ttft, 3),
        "ttft_2_images_s": round(image_ttft, 3),
        "end_to_end_text_tok_s": round(text_e2e, 1),
        "hf_generate_end_to_end_tok_s": round(hf_rate, 1),
        "ratio_reference_vs_hf_generate": round(text_e2e / hf_rate, 2),
        "bench_peak_rss_mb": round(peak_rss),
    }
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
