"""The run's JSONL log (`output_dir/log.jsonl`): one object per line, train and eval records.

Written by the main process only. On resume, lines from after the checkpoint (written by the
killed run for steps that will be redone) are dropped first, so the log reads as one run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"  # in the run's output_dir


class RunLog:
    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep the records of steps before `step` and the train records of `step` itself (its
        evaluation comes after the checkpoint and is redone on resume). Atomic rewrite."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            record_step = record.get("step", 0)
            if record_step < step or (record_step == step and record.get("type") == "train"):
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a run log, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
