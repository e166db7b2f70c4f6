"""`visualchat quantize` and `visualchat bench quant` end to end on a tiny checkpoint, and the
quality measures they use."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from factories import make_model, make_tokenizer
from torch import nn

from visualchat.cli import main
from visualchat.model.loading import LoadOptions, load_pretrained, save_pretrained
from visualchat.quant import QuantLinear
from visualchat.quant.bench import QuantBenchConfig, run_quant_bench
from visualchat.quant.quality import perplexity, reference_text, reference_token_ids


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = make_model(seed=1)
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    save_pretrained(model, tokenizer, folder)
    return folder


def test_quantize_command_writes_a_loadable_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q"
    argv = [
        "quantize",
        str(tiny_checkpoint),
        "--format",
        "int4",
        "--lorc-rank",
        "2",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "14 quantized" in printed and "in bf16" in printed and "on disk" in printed
    model, _ = load_pretrained(out, LoadOptions(device="cpu"))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {(m.fmt, m.lorc_rank) for m in layers} == {("int4", 2)}
    assert not list(tmp_path.glob(".q.*"))  # no temp folder left behind


def test_quantize_command_reports_a_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quantize", str(tmp_path / "nope"), "--format", "fp6_e3m2", "-o", str(tmp_path / "o")]
    assert main(argv) == 1
    assert "not a VisualChat checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_quant_command_runs_end_to_end(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "quant.json"
    argv = [
        "bench", "quant", "--model", str(tiny_checkpoint), "--formats", "fp6_e3m2,int4",
        "--lorc-rank", "2", "--max-text-tokens", "150", "--window", "64", "--stride", "32",
        "--decode-tokens", "4", "--eval-data", str(tmp_path / "no-such-set"), "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fp6_e3m2+lorc2" in printed and f"wrote {out}" in printed
    results = json.loads(out.read_text())
    names = [v["name"] for v in results["variants"]]
    assert names == ["float32 (reference)", "fp6_e3m2", "fp6_e3m2+lorc2", "int4", "int4+lorc2"]
    assert results["text"]["num_tokens"] == 150 and results["text"]["source"].startswith("pydoc")
    assert results["accuracy_note"].startswith("skipped: no held-out set")
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["float32 (reference)"]["ratio_vs_bf16"] == 2.0
    assert by_name["int4"]["ratio_vs_bf16"] < by_name["fp6_e3m2"]["ratio_vs_bf16"] < 1.0
    assert by_name["fp6_e3m2+lorc2"]["sqnr_db_median"] > by_name["fp6_e3m2"]["sqnr_db_median"]
    for variant in results["variants"]:
        assert math.isfinite(variant["perplexity"]) and variant["perplexity"] > 1
        assert variant["decode_tok_s"] > 0 and variant["accuracy"] is None
    assert not list(out.parent.glob(".quant.json.*"))


def test_bench_passes_each_variant_to_the_evaluator(tiny_checkpoint: Path, tmp_path: Path) -> None:
    seen = []

    def evaluate(vc) -> dict:
        seen.append(sum(isinstance(m, QuantLinear) for m in vc.model.modules()))
        return {"overall": {"correct": 1, "total": 2, "accuracy": 0.5}}

    config = QuantBenchConfig(
        model=str(tiny_checkpoint),
        formats=("fp4_e2m1",),
        lorc_rank=0,
        max_text_tokens=40,
        window=32,
        stride=32,
        decode_tokens=2,
        out=str(tmp_path / "q.json"),
    )
    results = run_quant_bench(config, evaluate=evaluate)
    assert seen == [0, 14]
    assert [v["accuracy"]["overall"]["accuracy"] for v in results["variants"]] == [0.5, 0.5]
    assert results["accuracy_note"] is None


class ZeroFavouringModel(nn.Module):
    """Logits that favour token 0 whatever the context: each target's loss depends only on
    whether it is 0, so the perplexity says whether every token was scored exactly once."""

    device = torch.device("cpu")

    def forward(self, ids: torch.Tensor, modality: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*ids.shape, 50)
        logits[..., 0] = 2.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize(("window", "stride"), [(16, 16), (16, 5), (100, 100)])
def test_perplexity_scores_each_token_once(window: int, stride: int) -> None:
    ids = torch.randint(0, 3, (61,), generator=torch.Generator().manual_seed(window + stride))
    log_total = math.log(math.exp(2.0) + 49)
    # Scored: every token with context in its window; disjoint windows skip their first tokens.
    scored = [t for t in range(1, 61) if stride < window or t % window]
    losses = [log_total - (2.0 if int(ids[t]) == 0 else 0.0) for t in scored]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(ZeroFavouringModel(), ids, window, stride) == pytest.approx(
        expected, rel=1e-6
    )


def test_perplexity_with_one_window_is_the_plain_cross_entropy() -> None:
    model, tokenizer = make_model(seed=2)
    ids = reference_token_ids(tokenizer, 48)
    with torch.no_grad():
        logits = model(ids[None], torch.zeros_like(ids)[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).exp()
    assert perplexity(model, ids, window=64, stride=64) == pytest.approx(float(expected), rel=1e-5)
    # Overlapping windows give more context to later tokens: a different, finite number.
    assert math.isfinite(perplexity(model, ids, window=16, stride=8))


def test_reference_text_is_the_fixed_offline_english_slice() -> None:
    assert reference_text().startswith('The "assert" statement')
    tokenizer = make_tokenizer()
    ids = reference_token_ids(tokenizer, 300)
    assert ids.shape == (300,)
    assert torch.equal(ids, reference_token_ids(tokenizer, 300))
    assert tokenizer.decode(ids[:4].tolist()).startswith("The")


def test_bench_quant_scores_through_the_engine_as_the_reference_decoder_does(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`--eval-batch-size` > 1 answers the held-out questions through the serving engine; the
    greedy answers, hence the scores, must be those of the reference decoder (batch size 1),
    and the engine must hand each variant's model back for the measurements after it."""
    import dataclasses

    from data_blend.recipe import BlendRecipe
    from data_blend.run import run_blend

    recipe = BlendRecipe.from_yaml(
        Path(__file__).resolve().parents[2] / "data_blend" / "recipes" / "synthetic_tiny.yaml"
    )
    run_blend(dataclasses.replace(recipe, output=tmp_path / "set", num_samples=6), progress=False)
    accuracies = {}
    for batch_size in (1, 4):
        out = tmp_path / f"quant-{batch_size}.json"
        argv = [
            "bench", "quant", "--model", str(tiny_checkpoint), "--formats", "int8",
            "--lorc-rank", "0", "--max-text-tokens", "40", "--window", "32", "--stride", "32",
            "--decode-tokens", "2", "--eval-data", str(tmp_path / "set"),
            "--eval-max-tokens", "3", "--eval-batch-size", str(batch_size), "--out", str(out),
        ]  # fmt: skip
        assert main(argv) == 0
        variants = json.loads(out.read_text())["variants"]
        accuracies[batch_size] = [v["accuracy"] for v in variants]
    assert accuracies[1][0]["overall"]["total"] > 0
    assert accuracies[4] == accuracies[1]
