"""Training curves: log records to lines, --max-step cuts, a PNG is written, bad folders fail."""

from __future__ import annotations

import json

from training.curves import main, read_curves


def _write_log(folder, records) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records] + ['{"type": "train", "st']  # a torn last line
    (folder / "log.jsonl").write_text("\n".join(lines))


def test_curves_read_train_and_eval_records_up_to_a_step(tmp_path) -> None:
    records = [{"type": "train", "step": s, "loss": 1.0 / s, "elapsed": 2.0 * s} for s in (1, 2, 3)]
    records.insert(2, {"type": "eval", "step": 2, "eval_loss": 0.7, "accuracy": 0.25})
    _write_log(tmp_path / "run", records)
    curves = read_curves(tmp_path / "run", "mmca")
    assert curves.train_steps == [1, 2, 3] and curves.train_loss == [1.0, 0.5, 1.0 / 3]
    assert (curves.eval_steps, curves.accuracy, curves.elapsed) == ([2], [0.25], 6.0)
    cut = read_curves(tmp_path / "run", "mmca", max_step=1)
    assert cut.train_steps == [1] and cut.eval_steps == []


def test_the_command_writes_a_png_and_refuses_a_missing_run(tmp_path, capsys) -> None:
    _write_log(tmp_path / "a", [{"type": "eval", "step": 5, "eval_loss": 1.0, "accuracy": 0.5}])
    _write_log(tmp_path / "b", [{"type": "train", "step": 5, "loss": 2.0}])
    out = tmp_path / "docs" / "curves.png"
    assert main([f"{tmp_path / 'a'}=MMCA", str(tmp_path / "b"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "MMCA: 0 train records, last held-out accuracy 50.0%" in printed
    assert main([str(tmp_path / "missing"), "-o", str(out)]) == 2
