"""benchmarks/splitfuse_load.py on a tiny checkpoint: one comparison per rate, each at its own
rate and request count, written as JSON and a plot; bad rates refused before any model loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from factories import make_model

from visualchat.model.loading import save_pretrained

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "splitfuse_load.py"


@pytest.fixture(scope="module")
def splitfuse_load():
    spec = importlib.util.spec_from_file_location("splitfuse_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_rate_gets_its_own_comparison(splitfuse_load, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer = make_model(seed=2, attention="causal")
    save_pretrained(model, tokenizer, tmp_path / "tiny")
    seen = []
    real = splitfuse_load.splitfuse_comparison

    def spy(model, tokenizer, cfg):
        seen.append((cfg.fastgen_rate, cfg.fastgen_requests, cfg.splitfuse_budget))
        return real(model, tokenizer, cfg)

    monkeypatch.setattr(splitfuse_load, "splitfuse_comparison", spy)
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "tiny"), "--rates", "20,40", "--requests", "2"]
    argv += ["--prompt-words", "20", "--tokens", "3", "--budget", "16"]
    assert splitfuse_load.main([*argv, "--out-dir", str(out)]) == 0
    assert seen == [(20.0, 2, 16), (40.0, 2, 16)]
    written = json.loads((out / "splitfuse_load.json").read_text())
    assert [p["rate"] for p in written["points"]] == [20.0, 40.0]
    for point in written["points"]:
        assert point["on"]["num_requests"] == point["off"]["num_requests"] == 2
        assert point["on"]["budget"] == 16
        ratio = point["on"]["inter_token_s"]["p95"] / point["off"]["inter_token_s"]["p95"]
        assert point["p95_ratio"] == pytest.approx(ratio)
    assert (out / "splitfuse_load.png").stat().st_size > 0

    # --rounds: each rate's comparison takes turns that many times, and prints each round's ratio
    assert splitfuse_load.main([*argv, "--rounds", "2", "--out-dir", str(out)]) == 0
    point = json.loads((out / "splitfuse_load.json").read_text())["points"][0]
    assert point["on"]["num_requests"] == 4 and len(point["rounds"]) == 2
    assert "(rounds " in splitfuse_load.format_row(point)
    with pytest.raises(SystemExit):
        splitfuse_load.main([*argv, "--rounds", "0", "--out-dir", str(out)])


@pytest.mark.parametrize("rates", ["0.2,x", "0,0.3", ""])
def test_bad_rates_are_refused(splitfuse_load, rates: str, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        splitfuse_load.main(["--rates", rates])
    assert raised.value.code == 2
    assert "--rates" in capsys.readouterr().err
