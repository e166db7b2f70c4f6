"""The serving benchmark (`visualchat bench serving`) end to end on a tiny checkpoint at tiny
sizes: every part runs and writes its JSON, and the SplitFuse part's two workloads are what
they say."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
from block_formats import make_gguf_like
from factories import make_model

from serving.bench import workloads as wl
from serving.bench.run import (
    BenchConfig,
    _splitfuse_workload,
    _summarise_timed,
    format_table,
    run_serving_bench,
)
from serving.engine import Engine, EngineConfig, EngineLoop, linear_kernels
from serving.engine.linear_kernels import KernelChoice
from visualchat.api import VisualChat
from visualchat.cli import main
from visualchat.model.loading import save_pretrained


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> BenchConfig:
    model, tokenizer = make_model(seed=2, attention="causal")
    root = tmp_path_factory.mktemp("bench")
    save_pretrained(model, tokenizer, root / "tiny")
    return BenchConfig(
        model=str(root / "tiny"),
        out_dir=str(root / "out"),
        num_chats=3,
        same_length=4,
        min_length=2,
        max_length=8,
        long_prompt_words=20,
        num_long_prompts=1,
        long_prompt_rate=20.0,
        num_streams=2,
        stream_tokens=6,
        splitfuse_budget=16,
        batching_budget=8,
        batching_rounds=2,
        fastgen_requests=4,  # the mixed workload has 3 requests: the counts tell them apart
        fastgen_rate=20.0,
        fastgen_tokens=4,
        curve_rates=(20.0,),
        curve_requests=2,
        curve_tokens=3,
        single_stream_tokens=4,
        single_stream_rounds=2,
    )


def test_every_part_runs_and_the_engine_matches_the_reference(tiny_config: BenchConfig) -> None:
    results = run_serving_bench(tiny_config)
    assert json.loads(Path(results["json"]).read_text())["splitfuse"]["workload"] == "mixed"
    for scenario in ("same_length", "varied_length"):
        batching = results["batching"][scenario]
        assert batching["engine_equals_reference_greedy"] is True
        # The same engine at the throughput budget: its own figures, the same tokens.
        assert batching["throughput_budget"]["budget"] == 8
        assert batching["throughput_budget"]["engine_equals_reference_greedy"] is True
        # Rounds: each engine ratio is the median of its rounds' ratios to the HF run beside it.
        for figures in (batching, batching["throughput_budget"]):
            engine_runs, hf_runs = (
                figures["engine_rounds_tok_s"],
                batching["hf_static_rounds_tok_s"],
            )
            assert len(engine_runs) == len(hf_runs) == 2
            assert figures["engine_vs_hf_static_rounds"] == pytest.approx(
                [e / h for e, h in zip(engine_runs, hf_runs, strict=True)]
            )
            assert figures["engine_vs_hf_static"] == pytest.approx(
                statistics.median(figures["engine_vs_hf_static_rounds"])
            )
    kernels = results["linear_kernels"]  # what the engine timed and chose on this machine
    assert set(kernels["by_rows"]) == set(kernels["pass_seconds"]) == {"1", "8", "64"}
    single = results["single_stream"]
    assert single["bandwidth_bound_tok_s"] > 0 and len(single["rounds"]) == 2
    # Each round pairs a bandwidth with the decode rate right after it; the median is quoted.
    for rate, fraction in (
        ("decode_tok_s", "fraction_of_bound"),
        ("loop_decode_tok_s", "loop_fraction_of_bound"),
    ):
        fractions = [r[rate] / r["bandwidth_bound_tok_s"] for r in single["rounds"]]
        assert single[fraction] == pytest.approx(statistics.median(fractions))
    assert "through the EngineLoop thread" in format_table(results)
    # float32 weights only (a random model is no block format): no second, float32 stream
    assert single["weight_bytes"] == single["float32_weight_bytes"]
    assert "single_stream_float32" not in results
    assert Path(results["curve"]["plot"]).stat().st_size > 0
    splitfuse = results["splitfuse"]
    for mode in ("chunked", "unchunked"):  # 2 streams and 1 long prompt
        summary = splitfuse[mode]
        assert summary["num_requests"] == 3 and summary["budget"] == 16
        assert summary["num_streams"] == 2 and 0 <= summary["streams_ended_early"] <= 2
        assert summary["long_prompt_ttft_s"]["p50"] > 0
    table = format_table(results)
    assert "engine / HF static / sequential" in table
    assert any(
        line.split()[:3] == ["splitfuse", "workload", "mixed"] for line in table.splitlines()
    )


def test_the_fastgen_workload_gives_every_request_a_long_prompt(tiny_config: BenchConfig) -> None:
    cfg = dataclasses.replace(tiny_config, splitfuse_workload="fastgen")
    results = run_serving_bench(cfg, parts=("splitfuse",))
    assert "batching" not in results and results["splitfuse"]["workload"] == "fastgen"
    for mode in ("chunked", "unchunked"):
        assert results["splitfuse"][mode]["num_requests"] == 4
    arrivals, streams = _splitfuse_workload(cfg)
    assert streams == []  # nothing decodes beside the long prompts but themselves
    assert [a[0] for a in arrivals] == sorted(a[0] for a in arrivals)
    assert all(tokens == cfg.fastgen_tokens for _, _, tokens in arrivals)
    prompts = [chat.messages[0].parts[0].text for _, chat, _ in arrivals]
    assert all(len(p.split()) > cfg.long_prompt_words for p in prompts)


def test_an_unknown_workload_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="splitfuse_workload must be one of"):
        _splitfuse_workload(BenchConfig(splitfuse_workload="bursty"))
    with pytest.raises(SystemExit):
        main(["bench", "serving", "--splitfuse-workload", "bursty"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_cli_passes_the_budget_and_workload_to_the_bench(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[BenchConfig, tuple[str, ...]]] = []

    def fake_bench(cfg: BenchConfig, parts: tuple[str, ...]) -> dict:
        seen.append((cfg, parts))
        return {"json": str(tmp_path / "serving.json")}

    monkeypatch.setattr("serving.bench.run.run_serving_bench", fake_bench)
    argv = ["bench", "serving", "--parts", "splitfuse", "--splitfuse-workload", "fastgen"]
    assert main([*argv, "--budget", "32", "--out-dir", str(tmp_path)]) == 0
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    assert main([*argv, "--batching-budget", "0", "--out-dir", str(tmp_path)]) == 0
    (with_budget, parts), (default, _), (no_batching_budget, _) = seen
    assert parts == ("splitfuse",) and with_budget.splitfuse_workload == "fastgen"
    assert with_budget.splitfuse_budget == 32 and default.splitfuse_budget is None
    assert default.batching_budget == 256 and no_batching_budget.batching_budget is None
    assert default.batching_rounds == 3
    assert main([*argv, "--batching-rounds", "1", "--out-dir", str(tmp_path)]) == 0
    assert seen[-1][0].batching_rounds == 1
    assert main([*argv, "--batching-rounds", "0", "--out-dir", str(tmp_path)]) == 2
    assert default.splitfuse_rounds == 1
    assert main([*argv, "--splitfuse-rounds", "2", "--out-dir", str(tmp_path)]) == 0
    assert seen[-1][0].splitfuse_rounds == 2
    assert main([*argv, "--splitfuse-rounds", "0", "--out-dir", str(tmp_path)]) == 2
    assert default.long_prompt_rate == BenchConfig.long_prompt_rate


def test_the_cli_sets_the_splitfuse_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[BenchConfig] = []

    def fake_bench(cfg: BenchConfig, parts: tuple[str, ...]) -> dict:
        seen.append(cfg)
        return {"json": str(tmp_path / "serving.json")}

    monkeypatch.setattr("serving.bench.run.run_serving_bench", fake_bench)
    argv = ["bench", "serving", "--parts", "splitfuse", "--out-dir", str(tmp_path)]
    assert main([*argv, "--arrival-rate", "0.9", "--num-long-prompts", "10"]) == 0
    assert main([*argv, "--num-streams", "5"]) == 0
    cfg, with_streams = seen
    assert cfg.long_prompt_rate == cfg.fastgen_rate == 0.9
    assert cfg.num_long_prompts == cfg.fastgen_requests == 10
    arrivals, streams = _splitfuse_workload(cfg)
    assert len(arrivals) == 10 and len(streams) == cfg.num_streams == BenchConfig.num_streams
    assert len(_splitfuse_workload(with_streams)[1]) == 5
    assert main([*argv, "--arrival-rate", "0"]) == 2
    assert main([*argv, "--num-long-prompts", "0"]) == 2
    assert main([*argv, "--num-streams", "-1"]) == 2
    assert len(seen) == 2


def test_the_mixed_workload_streams_decode_while_the_long_prompts_arrive() -> None:
    cfg = BenchConfig(num_streams=3, stream_tokens=50, num_long_prompts=4, long_prompt_tokens=7)
    arrivals, streams = _splitfuse_workload(cfg)
    assert [tokens for _, _, tokens in arrivals] == [7] * 4
    assert [tokens for _, _, tokens in streams] == [50] * 3
    # The streams are under way before the first long prompt comes.
    assert max(t for t, _, _ in streams) < min(t for t, _, _ in arrivals)
    prompts = [chat.messages[0].parts[0].text for _, chat, _ in arrivals]
    assert all(len(p.split()) > cfg.long_prompt_words for p in prompts)
    assert all(chat.messages[0].parts[1:] for _, chat, _ in streams)  # image chats


def test_streams_stop_once_every_arrival_is_answered() -> None:
    model, tokenizer = make_model(seed=2, attention="causal")
    engine = Engine(model, tokenizer, EngineConfig(max_num_batched_tokens=16))
    loop = EngineLoop(engine)
    chats = wl.image_chats(4, 3)
    try:
        # A stream with room for 400 tokens outlives the 3-token arrival; one with 2 does not.
        timed = wl.run_open_loop(
            loop, [(0.05, chats[0], 3)], [(0.0, chats[1], 400), (0.0, chats[2], 2)]
        )
    finally:
        loop.shutdown()
    arrival, long_stream, short_stream = timed
    assert len(arrival.token_times) == 3 and arrival.finish_reason == "length"
    assert short_stream.finish_reason == "length" and len(short_stream.token_times) == 2
    # Aborted once the arrival had its last token, not at its 400.
    assert long_stream.finish_reason == "abort"
    assert 3 <= len(long_stream.token_times) < 400
    assert not engine.requests and engine.blocks.num_used_blocks == 0  # the abort freed it


def test_a_budget_that_leaves_the_long_prompts_no_room_is_refused_or_raised(
    tiny_config: BenchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget caps the sequences running at once; at or under the number of streams the long
    prompts could not start until the streams end. Given, it is refused; picked by the engine,
    the bench takes the next candidate above the streams, for both engines, and says so."""
    cfg = dataclasses.replace(tiny_config, splitfuse_budget=2)  # and 2 streams
    with pytest.raises(ValueError, match="would leave the long prompts none"):
        run_serving_bench(cfg, parts=("splitfuse",))
    monkeypatch.setattr(Engine, "_pick_budget", lambda self: 2)
    cfg = dataclasses.replace(tiny_config, splitfuse_budget=None)
    splitfuse = run_serving_bench(cfg, parts=("splitfuse",))["splitfuse"]
    assert splitfuse["budget_picked"] == 2
    assert splitfuse["chunked"]["budget"] == splitfuse["unchunked"]["budget"] == 32
    assert splitfuse["chunked"]["num_requests"] == 3


def test_splitfuse_rounds_take_turns_and_each_mode_pools_its_rounds(
    tiny_config: BenchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On, off, then off, on: a slow phase of the machine falls on both modes."""
    modes: list[bool] = []
    run_open_loop = wl.run_open_loop

    def spying(loop: EngineLoop, arrivals, streams):
        modes.append(loop.engine.config.chunked_prefill)
        return run_open_loop(loop, arrivals, streams)

    monkeypatch.setattr(wl, "run_open_loop", spying)
    cfg = dataclasses.replace(tiny_config, splitfuse_rounds=2)
    splitfuse = run_serving_bench(cfg, parts=("splitfuse",))["splitfuse"]
    assert modes == [True, False, False, True]
    for mode in ("chunked", "unchunked"):  # 2 streams and 1 long prompt, twice
        summary = splitfuse[mode]
        assert summary["num_runs"] == 2 and summary["num_requests"] == 6
        assert 0 <= summary["streams_ended_early"] <= 4
        ttft = summary["long_prompt_ttft_s"]  # the long prompt of each round: two values
        assert ttft["p50"] < ttft["p99"]
    rounds = splitfuse["rounds"]
    assert [r["first"] for r in rounds] == ["chunked", "unchunked"]
    for r in rounds:
        assert r["p95_itl_ratio"] == r["p95_itl_chunked_s"] / r["p95_itl_unchunked_s"]
    assert "p95 ratio per round" in format_table({"splitfuse": splitfuse})
    with pytest.raises(ValueError, match="splitfuse_rounds must be positive"):
        run_serving_bench(dataclasses.replace(tiny_config, splitfuse_rounds=0), ("splitfuse",))


def test_the_summary_counts_stalled_gaps() -> None:
    # Gaps 0.1, 0.1, 2.0 and 0.25, 1.0 (exact in binary): two of five reach the 1 s mark.
    requests = [
        wl.TimedRequest(arrival=0.0, token_times=[0.5, 0.6, 0.7, 2.7]),
        wl.TimedRequest(arrival=0.0, token_times=[1.0, 1.25, 2.25]),
    ]
    summary = _summarise_timed(requests, BenchConfig(stall_s=1.0), seconds=3.0)
    assert summary["num_inter_token_gaps"] == 5
    assert summary["stalled_gap_fraction"] == pytest.approx(2 / 5)
    assert summary["max_inter_token_s"] == pytest.approx(2.0)


def test_decode_rates_count_the_gaps_after_the_first_token(tiny_config: BenchConfig) -> None:
    # Five tokens, the first at 1.0 s (prompt pass), then four gaps over 2 s: 2 tokens/s.
    timed = wl.TimedRequest(arrival=0.0, token_times=[1.0, 1.5, 2.0, 2.5, 3.0])
    assert timed.decode_rate == wl.decode_rate(timed.token_times) == pytest.approx(2.0)
    vc = VisualChat.from_pretrained(tiny_config.model)
    with Engine(vc.model, vc.tokenizer, EngineConfig(max_num_batched_tokens=16)) as engine:
        assert wl.direct_decode_rate(engine, wl.image_chats(1, 0)[0], 5) > 0
        assert not engine.has_unfinished_requests() and engine.blocks.num_used_blocks == 0


def test_every_batching_system_is_warmed_up_on_other_images_first(
    tiny_config: BenchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, frozenset]] = []  # (system, chats, images' bytes)

    def spying(name: str, run):
        def spy(system, chats, lengths):
            images = frozenset(p.image.tobytes() for c in chats for p in c.images())
            calls.append((name, len(chats), images))
            return run(system, chats, lengths)

        return spy

    for name in ("run_engine", "run_hf_static", "run_sequential"):
        monkeypatch.setattr(wl, name, spying(name, getattr(wl, name)))
    run_serving_bench(tiny_config, parts=("batching",))
    timed_images = frozenset().union(*(images for _, n, images in calls if n == 3))
    # Both engines, HF static and sequential each run once, untimed, before any timed run ...
    first_timed = next(i for i, (_, n, _) in enumerate(calls) if n == 3)
    assert [name for name, _, _ in calls[:first_timed]] == [
        "run_engine",
        "run_engine",
        "run_hf_static",
        "run_sequential",
    ]
    # ... on images none of the timed requests uses (their features are not cached for them).
    assert all(not (images & timed_images) for _, _, images in calls[:first_timed])
    # Then each scenario times the two engines and HF static in turns, a round at a time, and
    # sequential once, on all 3 chats.
    one_round = ["run_engine", "run_engine", "run_hf_static"]
    assert [name for name, _, _ in calls[first_timed:]] == 2 * [
        *(tiny_config.batching_rounds * one_round),
        "run_sequential",
    ]


def test_a_block_format_model_gets_its_stream_also_measured_on_float32_weights(
    tiny_config: BenchConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the engine multiplies blocks at one row, the bound divides by the blocks' bytes;
    the same stream on the float32 weights is measured beside it, against its own bound."""
    model, tokenizer = make_model(seed=2, attention="causal")
    make_gguf_like(model.language_model)
    save_pretrained(model, tokenizer, tmp_path / "gguf_like")
    monkeypatch.setattr(  # blocks wherever they are timed, whatever this machine would pick
        linear_kernels,
        "choose_kernels",
        lambda products, kernels, **_: (
            KernelChoice.always("blocks" if "blocks" in kernels else "linear"),
            {1: {}},
        ),
    )
    config = dataclasses.replace(tiny_config, model=str(tmp_path / "gguf_like"))
    results = run_serving_bench(config, parts=("single_stream",))
    blocks, floats = results["single_stream"], results["single_stream_float32"]
    assert blocks["weight_bytes"] < floats["weight_bytes"] == floats["float32_weight_bytes"]
    assert blocks["float32_weight_bytes"] == floats["weight_bytes"]
    assert "single stream on float32 weights" in format_table(results)
