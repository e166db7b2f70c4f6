"""Benchmark workloads: the same requests fed to the engine and to the baselines.

Every workload is built from fixed seeds, uses ignore_eos with fixed output lengths, and returns
wall-clock figures measured in this process, so ratios compare like with like in one run.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw

from serving.engine import Engine, EngineLoop
from serving.engine.loop import read_outputs
from visualchat.api import VisualChat
from visualchat.messages import Conversation
from visualchat.processor import ProcessedInputs
from visualchat.sampling import SamplingParams

COLOURS = ["red", "green", "blue", "orange", "purple", "black", "yellow", "brown"]


def scene_image(seed: int, size: int = 96) -> Image.Image:
    """A distinct small picture per seed (shapes in colours), so every chat has its own image."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x, y, r = rng.randint(10, size - 10), rng.randint(10, size - 10), rng.randint(6, 16)
        box = (x - r, y - r, x + r, y + r)
        colour = rng.choice(COLOURS)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def image_chats(num_chats: int, seed: int = 0) -> list[Conversation]:
    chats = []
    for i in range(num_chats):
        chat = Conversation()
        chat.add_user(f"Describe image 1 in detail, chat {i}.", [scene_image(seed * 1000 + i)])
        chats.append(chat)
    return chats


def long_prompt_chat(num_words: int, seed: int) -> Conversation:
    rng = random.Random(seed)
    words = ["river", "stone", "light", "house", "window", "garden", "paper", "cloud"]
    text = " ".join(rng.choice(words) for _ in range(num_words))
    chat = Conversation()
    chat.add_user(f"Summarise this text: {text}")
    return chat


@dataclass
class BatchResult:
    seconds: float
    num_tokens: int  # useful output tokens (what was asked for)
    token_ids: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds


def run_engine(engine: Engine, chats: list[Conversation], lengths: list[int]) -> BatchResult:
    inputs = [engine.process(c) for c in chats]  # preprocessing is not what is compared
    started = time.perf_counter()
    ids = [
        engine.add_request(x, SamplingParams(max_tokens=n, ignore_eos=True))
        for x, n in zip(inputs, lengths, strict=True)
    ]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    seconds = time.perf_counter() - started
    return BatchResult(seconds, sum(lengths), [tokens[i] for i in ids])


def run_sequential(vc: VisualChat, chats: list[Conversation], lengths: list[int]) -> BatchResult:
    started = time.perf_counter()
    outs = [
        vc.generate(c, SamplingParams(max_tokens=n, ignore_eos=True))
        for c, n in zip(chats, lengths, strict=True)
    ]
    return BatchResult(time.perf_counter() - started, sum(lengths), [o.token_ids for o in outs])


@torch.inference_mode()
def run_hf_static(vc: VisualChat, chats: list[Conversation], lengths: list[int]) -> BatchResult:
    """HF `generate()` on one left-padded batch of input embeddings (images spliced in), plain
    causal attention: a static batch runs until its longest request is done, so shorter
    requests waste their slots — the cost that continuous batching removes."""
    model = vc.model
    previous = model.config.attention
    model.set_attention("causal")
    try:
        embeds = []
        processed = [vc.process(c) for c in chats]
        feats = [vc.image_cache.features(model, p) for p in processed]
        started = time.perf_counter()
        for p, f in zip(processed, feats, strict=True):
            ids = p.input_ids.unsqueeze(0).to(model.device)
            embeds.append(model.embed(ids, p.token_modality.unsqueeze(0).to(model.device), f)[0])
        width = max(e.shape[0] for e in embeds)
        hidden = embeds[0].shape[-1]
        batch = torch.zeros(len(embeds), width, hidden, dtype=embeds[0].dtype)
        mask = torch.zeros(len(embeds), width, dtype=torch.long)
        for i, e in enumerate(embeds):
            batch[i, width - e.shape[0] :] = e  # left padding
            mask[i, width - e.shape[0] :] = 1
        out = model.language_model.generate(
            inputs_embeds=batch.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max(lengths),
            min_new_tokens=max(lengths),
            do_sample=False,
        )
        seconds = time.perf_counter() - started
    finally:
        model.set_attention(previous)
    token_ids = [out[i, :n].tolist() for i, n in enumerate(lengths)]
    return BatchResult(seconds, sum(lengths), token_ids)


@dataclass
class TimedRequest:
    arrival: float  # seconds since the workload started (when it was submitted)
    token_times: list[float] = field(default_factory=list)  # seconds since start, per token
    num_prompt_tokens: int = 0
    finish_reason: str | None = None  # "length", "stop", or "abort" for a stream stopped early

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def inter_token(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def decode_rate(self) -> float:
        return decode_rate(self.token_times)


def decode_rate(token_times: list[float]) -> float:
    """Tokens/s after the first token (the prompt pass excluded): gaps over their total time."""
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


def direct_decode_rate(
    engine: Engine, prompt: Conversation | ProcessedInputs, num_tokens: int
) -> float:
    """Decode rate of one request, stepping the engine on this thread (nothing else may step
    it meanwhile: an EngineLoop over the same engine must not be running)."""
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=num_tokens, ignore_eos=True))
    token_times = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id and out.new_token_ids:
                token_times.append(time.perf_counter())
    return decode_rate(token_times)


def run_open_loop(
    loop: EngineLoop,
    arrivals: list[tuple[float, Conversation, int]],  # (arrival second, chat, output tokens)
    streams: list[tuple[float, Conversation, int]] = (),  # (start second, chat, most tokens)
) -> list[TimedRequest]:
    """Submit each request at its arrival time (open loop: arrivals never wait for replies),
    stream it on its own thread and timestamp every token.

    `streams` are background conversations that keep decoding while `arrivals` come in: each
    starts at its second and reads tokens until every request of `arrivals` has its whole
    reply, then it is aborted (as a client's disconnect does), or until it has its most tokens,
    whichever comes first. The results are the arrivals' in order, then the streams'."""
    everything = [*arrivals, *streams]
    results = [TimedRequest(arrival=a) for a, _, _ in everything]
    started = time.perf_counter()
    inputs = [loop.engine.process(c) for _, c, _ in everything]
    request_ids: dict[int, str] = {}
    submitted = [threading.Event() for _ in everything]

    def consume(i: int) -> None:
        params = SamplingParams(max_tokens=everything[i][2], ignore_eos=True)
        results[i].num_prompt_tokens = inputs[i].num_tokens
        request_ids[i], sink = loop.submit(inputs[i], params)
        submitted[i].set()
        for out in read_outputs(sink):
            now = time.perf_counter() - started
            results[i].token_times += [now] * len(out.new_token_ids)
            results[i].finish_reason = out.finish_reason  # None until the last output

    order = sorted(range(len(everything)), key=lambda i: everything[i][0])
    threads: list[threading.Thread] = []
    for i in order:
        delay = everything[i][0] - (time.perf_counter() - started)
        if delay > 0:
            time.sleep(delay)
        results[i].arrival = time.perf_counter() - started
        thread = threading.Thread(target=consume, args=(i,), daemon=True)
        thread.start()
        threads.append(thread)
    by_index = dict(zip(order, threads, strict=True))
    for i in range(len(arrivals)):
        by_index[i].join()
    # Every arrival has its reply: the streams stop. An abort reaches a stream that is waiting
    # (for admission, or preempted) as well as one decoding; one already finished ignores it.
    for i in range(len(arrivals), len(everything)):
        submitted[i].wait()
        loop.abort(request_ids[i])
        by_index[i].join()
    return results


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "mean": statistics.fmean(ordered),
    }


def poisson_arrivals(rate: float, count: int, seed: int, start: float = 0.0) -> list[float]:
    rng = random.Random(seed)
    t, out = start, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out
