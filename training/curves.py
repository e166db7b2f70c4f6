"""Training curves from run logs: loss and held-out accuracy per step, one line per run.

`python -m training.curves runs/embedded=MMCA runs/embedded_causal=causal -o docs/training.png`
draws the MMCA-versus-causal comparison of the README from the runs' `log.jsonl` files (the
trainer writes one "train" record per log window and one "eval" record per held-out
evaluation). A run may be compared up to a step (`--max-step`) so runs of unequal length are
shown at equal training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from training.run_log import LOG_NAME
from visualchat.atomic import atomic_save_figure


@dataclass
class RunCurves:
    label: str
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    elapsed: float | None = None  # seconds to the last train record


def read_curves(run_dir: str | os.PathLike, label: str, max_step: int | None = None) -> RunCurves:
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training output folder?")
    curves = RunCurves(label)
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        step = record.get("step", 0)
        if max_step is not None and step > max_step:
            continue
        if record.get("type") == "train":
            curves.train_steps.append(step)
            curves.train_loss.append(record["loss"])
            curves.elapsed = record.get("elapsed")
        elif record.get("type") == "eval":
            curves.eval_steps.append(step)
            curves.eval_loss.append(record["eval_loss"])
            curves.accuracy.append(record.get("accuracy"))
    return curves


def plot_curves(runs: Sequence[RunCurves], out: str | os.PathLike, title: str = "") -> None:
    """Two panels (training/held-out loss; held-out accuracy), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        (line,) = loss_ax.plot(run.train_steps, run.train_loss, label=f"{run.label} train")
        if run.eval_steps:
            loss_ax.plot(
                run.eval_steps, run.eval_loss, "o--", color=line.get_color(),
                label=f"{run.label} held-out",
            )  # fmt: skip
        scored = [
            (s, a) for s, a in zip(run.eval_steps, run.accuracy, strict=True) if a is not None
        ]
        if scored:
            acc_ax.plot(
                [s for s, _ in scored], [100 * a for _, a in scored], "o-",
                color=line.get_color(), label=run.label,
            )  # fmt: skip
    loss_ax.set_xlabel("optimiser step")
    loss_ax.set_ylabel("loss (nats per answer token)")
    loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=8)
    acc_ax.set_xlabel("optimiser step")
    acc_ax.set_ylabel("held-out exact match (%)")
    acc_ax.set_ylim(0, 100)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, out)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.curves", description="Plot training runs' loss and accuracy."
    )
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL")
    parser.add_argument("-o", "--out", required=True, help="PNG to write")
    parser.add_argument("--max-step", type=int, default=None, help="compare up to this step")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        folder, _, label = spec.partition("=")
        try:
            runs.append(read_curves(folder, label or Path(folder).name, args.max_step))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    plot_curves(runs, args.out, args.title)
    for run in runs:
        last = next((a for a in reversed(run.accuracy) if a is not None), None)
        shown = "-" if last is None else f"{100 * last:.1f}%"
        print(f"{run.label}: {len(run.train_steps)} train records, last held-out accuracy {shown}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
