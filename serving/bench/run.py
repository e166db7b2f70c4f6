"""`visualchat bench serving`: batching, SplitFuse, single stream, latency-throughput curve.

All parts run in one process on the same model, so their ratios are comparable; the JSON holds
every raw figure and the table the medians/ratios quoted in the README.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from serving.bench import workloads as wl
from serving.engine import Engine, EngineConfig, EngineLoop
from serving.engine.engine import BUDGET_CANDIDATES
from serving.engine.linear_kernels import EngineLinears
from visualchat.api import VisualChat
from visualchat.atomic import atomic_save_figure, atomic_write_json

logger = logging.getLogger(__name__)


SplitFuseWorkload = Literal["mixed", "fastgen"]
SPLITFUSE_WORKLOADS: tuple[str, ...] = get_args(SplitFuseWorkload)


@dataclass
class BenchConfig:
    model: str | None = None  # checkpoint folder; None = embedded default
    out_dir: str = "benchmarks/results"
    num_chats: int = 16  # batching: concurrent chats, one image each
    same_length: int = 64  # batching: output tokens when all lengths are equal
    min_length: int = 8  # batching: varied output lengths in [min_length, max_length]
    max_length: int = 256
    # The batching part measures throughput, which the engine's own budget (picked for a 250 ms
    # step, to keep inter-token latency low) does not aim at: the same engine also runs it with
    # this budget (None: not run). 256 was the best of 64/128/256/512/1024 for 16 image chats here
    # (README, "Serving engine").
    batching_budget: int | None = 256
    # Rounds of the engine(s) and HF's static batch, taking turns (the machine is shared and
    # its speed drifts by 10-20% between minutes); the sequential baseline runs once.
    batching_rounds: int = 3
    long_prompt_words: int = 1000  # SplitFuse: ~1,050 prompt tokens each
    num_long_prompts: int = 12
    long_prompt_rate: float = 0.3  # arrivals per second (Poisson)
    long_prompt_tokens: int = 16  # each long prompt's reply
    # "mixed": this many image chats decode from the start until every long prompt has its
    # reply (then they are aborted), at most stream_tokens tokens each. A server
    # this busy has decode steps long enough (0.15-0.2 s at 32 rows on the 2-core CPU) that
    # the long prompts' stalls are a visible share of the gaps; see README, "SplitFuse".
    num_streams: int = 32
    stream_tokens: int = 2048
    # The streams and the queued prompts together outgrow the default 16,384-token cache; a
    # preempted stream would be recomputed, which neither mode is being measured for.
    splitfuse_cache_tokens: int = 32768
    # "mixed": the streams above plus the long prompts; "fastgen": DeepSpeed-FastGen's own
    # setup, every request a long prompt with a moderate reply, arriving open-loop.
    splitfuse_workload: SplitFuseWorkload = "mixed"
    fastgen_requests: int = 12
    fastgen_rate: float = 0.2  # arrivals per second (Poisson)
    fastgen_tokens: int = 64
    ttft_sla_s: float = 20.0  # effective throughput: a request counts if it meets both
    min_decode_rate: float = 2.0  # tokens/s after its first token
    # An inter-token gap this long counts as a stall (a decode step here is 0.03-0.3 s; an
    # unchunked ~1,050-token prefill 2-8 s): the share of stalled gaps decides whether p95 sees
    # them at all.
    stall_s: float = 1.0
    splitfuse_budget: int | None = None  # None: the engine's own pick from its latency target
    # Rounds of the two modes, taking turns (on, off, then off, on, ...), so that a slow phase
    # of this shared machine falls on both; each mode's figures pool its rounds, and each
    # round's own p95 ratio is kept beside them. 1: on, then off.
    splitfuse_rounds: int = 1
    curve_rates: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # offered loads, requests/s
    curve_requests: int = 8
    curve_tokens: int = 32
    single_stream_tokens: int = 64
    single_stream_rounds: int = 5  # (bandwidth, decode) pairs; the median fraction is quoted
    seed: int = 0

    def with_splitfuse_load(
        self, rate: float | None = None, num_prompts: int | None = None
    ) -> BenchConfig:
        """A copy whose SplitFuse part, either workload, has `rate` long prompts/s arriving and
        `num_prompts` of them (None: unchanged)."""
        changes: dict[str, Any] = {}
        if rate is not None:
            changes.update(long_prompt_rate=rate, fastgen_rate=rate)
        if num_prompts is not None:
            changes.update(num_long_prompts=num_prompts, fastgen_requests=num_prompts)
        return dataclasses.replace(self, **changes)


def batching_workload(cfg: BenchConfig) -> tuple[list, dict[str, list[int]]]:
    """The batching part's chats and, per scenario, each chat's output length."""
    chats = wl.image_chats(cfg.num_chats, cfg.seed)
    rng = random.Random(cfg.seed)
    scenarios = {
        "same_length": [cfg.same_length] * cfg.num_chats,
        "varied_length": [rng.randint(cfg.min_length, cfg.max_length) for _ in chats],
    }
    return chats, scenarios


def _batching(
    engine: Engine, throughput_engine: Engine | None, vc: VisualChat, cfg: BenchConfig
) -> dict[str, Any]:
    chats, scenarios = batching_workload(cfg)
    # One short untimed run of each system on other images first: none of them pays its first
    # pass's allocations in the timed runs (the first one timed used to).
    warm_up = wl.image_chats(2, cfg.seed + 1)
    for eng in (engine, throughput_engine):
        if eng is not None:
            wl.run_engine(eng, warm_up, [4, 4])
    wl.run_hf_static(vc, warm_up, [4, 4])
    wl.run_sequential(vc, warm_up[:1], [4])
    results: dict[str, Any] = {}
    engines = {"engine": engine, "throughput_budget": throughput_engine}
    engines = {key: eng for key, eng in engines.items() if eng is not None}
    for name, lengths in scenarios.items():
        # The engines and HF's static batch take turns, round after round, so a slow phase of
        # the shared machine falls on each of them; each ratio quoted is the median of the
        # rounds' own ratios. The sequential baseline (minutes) runs once.
        runs: dict[str, list[wl.BatchResult]] = {key: [] for key in (*engines, "hf")}
        for round_ in range(cfg.batching_rounds):
            for key, eng in engines.items():
                logger.info("batching/%s round %d: engine (budget %d)", name, round_, eng.budget)
                runs[key].append(wl.run_engine(eng, chats, lengths))
            logger.info("batching/%s round %d: HF static batch", name, round_)
            runs["hf"].append(wl.run_hf_static(vc, chats, lengths))
        logger.info("batching/%s: sequential reference decoder", name)
        seq = wl.run_sequential(vc, chats, lengths)
        hf_tok_s = [r.tokens_per_second for r in runs["hf"]]
        results[name] = {
            "lengths": lengths,
            "engine_budget": engine.budget,
            **_engine_figures(runs["engine"], runs["hf"], seq),
            "hf_static_tok_s": statistics.median(hf_tok_s),
            "hf_static_rounds_tok_s": hf_tok_s,
            "sequential_tok_s": seq.tokens_per_second,
            "hf_static_vs_sequential": statistics.median(hf_tok_s) / seq.tokens_per_second,
        }
        if throughput_engine is not None:
            results[name]["throughput_budget"] = {
                "budget": throughput_engine.budget,
                **_engine_figures(runs["throughput_budget"], runs["hf"], seq),
            }
    return results


def _engine_figures(
    eng: list[wl.BatchResult], hf: list[wl.BatchResult], seq: wl.BatchResult
) -> dict[str, Any]:
    """An engine's rounds against the baselines' on the same requests (round i of each ran
    back to back): median tokens/s, the median of the per-round ratios to HF's static batch."""
    tok_s = [r.tokens_per_second for r in eng]
    vs_hf = [e.tokens_per_second / h.tokens_per_second for e, h in zip(eng, hf, strict=True)]
    return {
        "engine_tok_s": statistics.median(tok_s),
        "engine_rounds_tok_s": tok_s,
        "engine_vs_hf_static": statistics.median(vs_hf),
        "engine_vs_hf_static_rounds": vs_hf,
        "engine_vs_sequential": statistics.median(tok_s) / seq.tokens_per_second,
        # every round's tokens, not only one
        "engine_equals_reference_greedy": all(r.token_ids == seq.token_ids for r in eng),
    }


SplitFuseRequests = tuple[list[tuple[float, Any, int]], list[tuple[float, Any, int]]]


def _splitfuse_workload(cfg: BenchConfig) -> SplitFuseRequests:
    """The arrivals, (second, conversation, output tokens) by arrival, and the background
    streams (second, conversation, most tokens) that decode until the arrivals are answered
    (workloads.run_open_loop)."""
    if cfg.splitfuse_workload not in SPLITFUSE_WORKLOADS:
        raise ValueError(
            f"splitfuse_workload must be one of {SPLITFUSE_WORKLOADS}, got {cfg.splitfuse_workload!r}"
        )
    if cfg.splitfuse_workload == "fastgen":
        # Every arrival is a long prefill; unchunked, each one stalls every request decoding
        # at that moment.
        times = wl.poisson_arrivals(cfg.fastgen_rate, cfg.fastgen_requests, cfg.seed)
        arrivals = [
            (t, wl.long_prompt_chat(cfg.long_prompt_words, cfg.seed + 100 + i), cfg.fastgen_tokens)
            for i, t in enumerate(times)
        ]
        return arrivals, []
    streams = [
        (0.05 * i, c, cfg.stream_tokens) for i, c in enumerate(wl.image_chats(cfg.num_streams, 7))
    ]
    # The first prompt comes once the streams are decoding.
    times = wl.poisson_arrivals(cfg.long_prompt_rate, cfg.num_long_prompts, cfg.seed, start=2.0)
    arrivals = [
        (t, wl.long_prompt_chat(cfg.long_prompt_words, cfg.seed + i), cfg.long_prompt_tokens)
        for i, t in enumerate(times)
    ]
    return arrivals, streams


def _summarise_timed(requests: list[wl.TimedRequest], cfg: BenchConfig, seconds: float) -> dict:
    itl = [gap for r in requests for gap in r.inter_token]
    ttft = [r.ttft for r in requests]
    meets = [
        r
        for r in requests
        if r.ttft <= cfg.ttft_sla_s
        and (len(r.token_times) < 2 or r.decode_rate >= cfg.min_decode_rate)
    ]
    tokens = sum(len(r.token_times) for r in requests)
    return {
        "ttft_s": wl.percentiles(ttft),
        "max_inter_token_s": max(itl, default=0.0),
        "inter_token_s": wl.percentiles(itl),
        "num_inter_token_gaps": len(itl),
        "stall_s": cfg.stall_s,
        "stalled_gap_fraction": sum(gap >= cfg.stall_s for gap in itl) / max(len(itl), 1),
        "throughput_tok_s": tokens / seconds,
        "effective_throughput_req_s": len(meets) / seconds,
        "num_requests": len(requests),
        "num_meeting_sla": len(meets),
        "max_prompt_tokens": max(r.num_prompt_tokens for r in requests),
    }


def splitfuse_comparison(model, tokenizer, cfg: BenchConfig) -> dict[str, Any]:
    results: dict[str, Any] = {
        "workload": cfg.splitfuse_workload,
        "arrival_rate": cfg.fastgen_rate
        if cfg.splitfuse_workload == "fastgen"
        else cfg.long_prompt_rate,
    }
    if cfg.splitfuse_rounds < 1:
        raise ValueError(f"splitfuse_rounds must be positive, not {cfg.splitfuse_rounds}")
    arrivals, streams = _splitfuse_workload(cfg)
    budget = cfg.splitfuse_budget  # None: the chunked engine picks it, the other one shares it
    if budget is not None and budget <= len(streams):
        raise ValueError(
            f"a budget of {budget} runs at most {budget} sequences at once: {len(streams)} "
            "streams would leave the long prompts none; give a larger budget or fewer streams"
        )

    def make_engine(chunked: bool, budget: int | None) -> Engine:
        return Engine(
            copy.deepcopy(model),
            tokenizer,
            EngineConfig(
                max_num_batched_tokens=budget,
                chunked_prefill=chunked,
                max_cache_tokens=cfg.splitfuse_cache_tokens,
            ),
        )

    def run_once(chunked: bool) -> tuple[list[wl.TimedRequest], float]:
        nonlocal budget
        engine = make_engine(chunked, budget)
        if engine.budget <= len(streams):  # the engine's own pick: the next that leaves room
            picked = results["budget_picked"] = engine.budget
            engine.close()
            raised = min(b for b in BUDGET_CANDIDATES if b > len(streams))
            logger.warning(
                "budget %d leaves no room beside %d streams; %d", picked, len(streams), raised
            )
            engine = make_engine(chunked, raised)
        # Every run has one budget: it also caps the sequences running at once, and two
        # start-up probes on this shared machine can pick different ones (32 and 64 did).
        budget = engine.budget
        loop = EngineLoop(engine)
        try:
            started = time.perf_counter()
            timed = wl.run_open_loop(loop, arrivals, streams)
            return timed, time.perf_counter() - started
        finally:
            loop.shutdown()

    runs: dict[bool, list[tuple[list[wl.TimedRequest], float]]] = {True: [], False: []}
    rounds = []
    for round_index in range(cfg.splitfuse_rounds):
        order = (True, False) if round_index % 2 == 0 else (False, True)
        p95 = {}
        for chunked in order:
            timed, seconds = run_once(chunked)
            runs[chunked].append((timed, seconds))
            p95[chunked] = _summarise_timed(timed, cfg, seconds)["inter_token_s"]["p95"]
        rounds.append(
            {
                "first": "chunked" if order[0] else "unchunked",
                "p95_itl_chunked_s": p95[True],
                "p95_itl_unchunked_s": p95[False],
                "p95_itl_ratio": p95[True] / p95[False],
            }
        )
    for chunked, mode_runs in runs.items():
        timed = [r for requests, _ in mode_runs for r in requests]
        summary = _summarise_timed(timed, cfg, sum(seconds for _, seconds in mode_runs))
        summary["budget"] = budget
        summary["num_streams"] = len(streams)
        summary["num_runs"] = len(mode_runs)
        if streams:
            prompts = [r for requests, _ in mode_runs for r in requests[: len(arrivals)]]
            background = [r for requests, _ in mode_runs for r in requests[len(arrivals) :]]
            summary["long_prompt_ttft_s"] = wl.percentiles([r.ttft for r in prompts])
            # A stream that reached its most tokens stopped decoding before the last prompt
            # was answered: the later gaps saw fewer streams than configured.
            summary["streams_ended_early"] = sum(r.finish_reason != "abort" for r in background)
        results["chunked" if chunked else "unchunked"] = summary
    results["rounds"] = rounds
    on, off = results["chunked"], results["unchunked"]
    results["p95_itl_ratio_chunked_vs_unchunked"] = (
        on["inter_token_s"]["p95"] / off["inter_token_s"]["p95"]
    )
    return results


def weight_bytes_per_token(
    language_model: torch.nn.Module, linears: EngineLinears | None = None
) -> int:
    """Bytes of weights a one-row decode step reads: every parameter once (tied embeddings are
    one), except that where `linears` (an engine's kernels) multiply a product's block form at
    one row (serving/engine/block_weights.py) the step reads the blocks and their low-rank
    factors instead of the float32 weights."""
    seen, total = set(), 0
    for p in language_model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    if linears is not None and linears.choice.kernel_for(1) == "blocks":
        for product in linears.products:
            if product.block_weight is not None:
                weight = product.weight
                total += product.block_weight.num_bytes - weight.numel() * weight.element_size()
    return total


def read_bandwidth(data: torch.Tensor, repeats: int = 3) -> float:
    """Bytes/s of streaming reads (best of `repeats` sums over `data`, larger than any cache)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def _single_stream(engine: Engine, cfg: BenchConfig) -> dict[str, Any]:
    chat = wl.image_chats(1, 99)[0]
    rates = []
    for _ in range(3):
        result = wl.run_engine(engine, [chat], [cfg.single_stream_tokens])
        rates.append(result.tokens_per_second)
    weight_bytes = weight_bytes_per_token(engine.model.language_model, engine.runner.linears)
    # The machine's read bandwidth moves from minute to minute (it is shared: 35 to 68 GB/s
    # within one session), so each round measures the bandwidth and then the decode rates right
    # after it, and each fraction quoted is the median of the rounds' own fractions.
    # Two decode rates: engine.step() on this (the main) thread, and through the EngineLoop's
    # background thread as the server runs it. They differ on a 2-core CPU: a second thread
    # running OpenMP work gives libgomp more threads than cores, and it then stops spinning
    # between parallel regions, so every region pays a wake-up (see README).
    rounds = []
    data = torch.ones(128 * 2**20, dtype=torch.float32)  # 512 MB
    for _ in range(cfg.single_stream_rounds):
        bandwidth = read_bandwidth(data)
        bound = bandwidth / weight_bytes
        direct = wl.direct_decode_rate(engine, engine.process(chat), cfg.single_stream_tokens)
        # Through a loop (started after the direct run: only one thread may step an engine),
        # the gaps between streamed tokens (the prompt pass excluded).
        loop = EngineLoop(engine)
        try:
            timed = wl.run_open_loop(loop, [(0.0, chat, cfg.single_stream_tokens)])[0]
        finally:
            loop.shutdown()
        looped = timed.decode_rate
        rounds.append(
            {
                "read_bandwidth_gb_s": bandwidth / 1e9,
                "bandwidth_bound_tok_s": bound,
                "decode_tok_s": direct,
                "fraction_of_bound": direct / bound,
                "loop_decode_tok_s": looped,
                "loop_fraction_of_bound": looped / bound,
            }
        )

    def middle(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    return {
        "end_to_end_tok_s_median": sorted(rates)[1],
        "weight_bytes": weight_bytes,
        "float32_weight_bytes": weight_bytes_per_token(engine.model.language_model),
        **{key: middle(key) for key in rounds[0]},
        "rounds": rounds,
    }


def _curve(model, tokenizer, cfg: BenchConfig, out_dir: Path) -> dict[str, Any]:
    engine = Engine(
        copy.deepcopy(model), tokenizer, EngineConfig(max_num_batched_tokens=cfg.splitfuse_budget)
    )
    loop = EngineLoop(engine)
    points = []
    try:
        for rate in cfg.curve_rates:
            times = wl.poisson_arrivals(rate, cfg.curve_requests, cfg.seed + int(rate * 100))
            chats = wl.image_chats(cfg.curve_requests, 50 + int(rate * 100))
            started = time.perf_counter()
            timed = wl.run_open_loop(
                loop, [(t, c, cfg.curve_tokens) for t, c in zip(times, chats, strict=True)]
            )
            seconds = time.perf_counter() - started
            latency = [r.token_times[-1] - r.arrival for r in timed]
            points.append(
                {
                    "offered_req_s": rate,
                    "throughput_tok_s": sum(len(r.token_times) for r in timed) / seconds,
                    "latency_s": wl.percentiles(latency),
                    "ttft_s": wl.percentiles([r.ttft for r in timed]),
                }
            )
    finally:
        loop.shutdown()
    _plot_curve(points, out_dir / "latency_throughput.png")
    return {"points": points, "plot": str(out_dir / "latency_throughput.png")}


def _plot_curve(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["throughput_tok_s"] for p in points]
    ax.plot(xs, [p["latency_s"]["p50"] for p in points], "o-", label="p50 request latency")
    ax.plot(xs, [p["latency_s"]["p95"] for p in points], "s--", label="p95 request latency")
    for p, x in zip(points, xs, strict=True):
        ax.annotate(f"{p['offered_req_s']} req/s", (x, p["latency_s"]["p50"]), fontsize=7)
    ax.set_xlabel("throughput (output tokens/s)")
    ax.set_ylabel("latency (s)")
    ax.set_title("VisualChat engine, embedded model, CPU")
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def run_serving_bench(cfg: BenchConfig, parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    parts = parts or ("batching", "splitfuse", "single_stream", "curve")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vc = VisualChat.from_pretrained(cfg.model)
    model, tokenizer = vc.model, vc.tokenizer
    results: dict[str, Any] = {"config": cfg.__dict__, "threads": torch.get_num_threads()}
    engine = Engine(copy.deepcopy(model), tokenizer, EngineConfig())
    results["engine_budget"] = engine.budget
    if engine.runner.linears is not None:  # the linear kernels it timed and chose on this machine
        linears = engine.runner.linears
        results["linear_kernels"] = {
            "by_rows": {str(rows): kernel for rows, kernel in linears.choice.by_rows.items()},
            "pass_seconds": {str(rows): by for rows, by in linears.seconds.items()},
        }
    if "batching" in parts:
        throughput_engine = None
        if cfg.batching_budget is not None:
            throughput_engine = Engine(
                copy.deepcopy(model),
                tokenizer,
                EngineConfig(max_num_batched_tokens=cfg.batching_budget),
            )
        results["batching"] = _batching(engine, throughput_engine, vc, cfg)
        del throughput_engine
    if "single_stream" in parts:
        stream = results["single_stream"] = _single_stream(engine, cfg)
        if stream["weight_bytes"] != stream["float32_weight_bytes"]:  # it read blocks
            # The same stream on the float32 weights: the bound moves with the bytes a step
            # reads (4 bytes a weight there against ~0.75 in blocks), so both are reported.
            float_engine = Engine(
                copy.deepcopy(model), tokenizer, EngineConfig(block_kernels=False)
            )
            results["single_stream_float32"] = _single_stream(float_engine, cfg)
            del float_engine
    if "splitfuse" in parts:
        results["splitfuse"] = splitfuse_comparison(model, tokenizer, cfg)
    if "curve" in parts:
        results["curve"] = _curve(model, tokenizer, cfg, out_dir)
    path = out_dir / "serving.json"
    atomic_write_json(path, results)
    results["json"] = str(path)
    return results


def format_table(results: dict[str, Any]) -> str:
    rows = [("measure", "value")]
    for name, r in results.get("batching", {}).items():
        rows += [
            (
                f"{name}: engine / HF static / sequential tok/s",
                f"{r['engine_tok_s']:.1f} / {r['hf_static_tok_s']:.1f} / {r['sequential_tok_s']:.1f}",
            ),
            (
                f"{name}: engine vs HF static, vs sequential",
                f"{r['engine_vs_hf_static']:.2f}x, {r['engine_vs_sequential']:.2f}x",
            ),
            (f"{name}: engine greedy == reference", str(r["engine_equals_reference_greedy"])),
        ]
        t = r.get("throughput_budget")
        if t:
            rows += [
                (
                    f"{name}: engine at budget {t['budget']} tok/s, vs HF static, vs sequential",
                    f"{t['engine_tok_s']:.1f}, {t['engine_vs_hf_static']:.2f}x, "
                    f"{t['engine_vs_sequential']:.2f}x",
                ),
                (
                    f"{name}: engine at budget {t['budget']} greedy == reference",
                    str(t["engine_equals_reference_greedy"]),
                ),
            ]
    sf = results.get("splitfuse")
    if sf:
        rows.append(("splitfuse workload", f"{sf['workload']} at {sf['arrival_rate']} prompts/s"))
        for mode in ("chunked", "unchunked"):
            m = sf[mode]
            rows.append(
                (
                    f"splitfuse {mode}: ITL p50/p95/p99 s",
                    "/".join(f"{m['inter_token_s'][k]:.3f}" for k in ("p50", "p95", "p99")),
                )
            )
            rows.append((f"splitfuse {mode}: longest stall s", f"{m['max_inter_token_s']:.2f}"))
            rows.append(
                (
                    f"splitfuse {mode}: gaps >= {m['stall_s']} s (stalls)",
                    f"{m['stalled_gap_fraction']:.1%} of {m['num_inter_token_gaps']}",
                )
            )
            rows.append(
                (
                    f"splitfuse {mode}: TTFT p50/p95 s, effective req/s",
                    f"{m['ttft_s']['p50']:.2f}/{m['ttft_s']['p95']:.2f}, {m['effective_throughput_req_s']:.3f}",
                )
            )
            if "long_prompt_ttft_s" in m:
                rows.append(
                    (
                        f"splitfuse {mode}: long prompts' TTFT p50/p95 s; streams ended early",
                        f"{m['long_prompt_ttft_s']['p50']:.2f}/{m['long_prompt_ttft_s']['p95']:.2f}; "
                        f"{m['streams_ended_early']} of {m['num_streams']}",
                    )
                )
        rows.append(
            (
                "splitfuse: p95 ITL chunked / unchunked",
                f"{sf['p95_itl_ratio_chunked_vs_unchunked']:.2f}",
            )
        )
        if len(sf.get("rounds", [])) > 1:
            rows.append(
                (
                    "splitfuse: p95 ratio per round (first mode)",
                    ", ".join(f"{r['p95_itl_ratio']:.2f} ({r['first']})" for r in sf["rounds"]),
                )
            )
    ss = results.get("single_stream")
    if ss:
        rows.append(
            (
                "single stream decode tok/s (bound)",
                f"{ss['decode_tok_s']:.1f} ({ss['bandwidth_bound_tok_s']:.1f})",
            )
        )
        rows.append(("single stream fraction of bandwidth bound", f"{ss['fraction_of_bound']:.2f}"))
        floats = results.get("single_stream_float32")
        if floats:
            rows.append(
                (
                    "single stream on float32 weights tok/s (bound), fraction",
                    f"{floats['decode_tok_s']:.1f} ({floats['bandwidth_bound_tok_s']:.1f}), "
                    f"{floats['fraction_of_bound']:.2f}",
                )
            )
        rows.append(
            (
                "single stream through the EngineLoop thread tok/s, fraction",
                f"{ss['loop_decode_tok_s']:.1f}, {ss['loop_fraction_of_bound']:.2f}",
            )
        )
    for p in results.get("curve", {}).get("points", []):
        rows.append(
            (
                f"curve {p['offered_req_s']} req/s: tok/s, p50/p95 latency s",
                f"{p['throughput_tok_s']:.1f}, {p['latency_s']['p50']:.2f}/{p['latency_s']['p95']:.2f}",
            )
        )
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
