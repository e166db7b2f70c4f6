"""Training checkpoints: what was trained, the optimiser, and where the run stands.

Design note. A run can be killed at any moment, so a checkpoint is never visible until it is
complete: it is written into a temp folder that is renamed into place (`step-000123/`), and
only then does `latest` (a one-line file replaced atomically with os.replace) point at it; old
checkpoints are pruned last. A kill therefore leaves either the previous `latest` or the new
one, plus at worst a dot-prefixed temp folder that the next run sweeps away. Only the trainable
groups are stored (vision, projector, LoRA): the frozen backbone is rebuilt from the recipe's
init, which keeps a checkpoint small and makes "frozen weights unchanged" hold by construction.

    step-000123/
      trainable.safetensors   every tensor trained so far, by VisualChatModel parameter name
      optimizer.pt            optimizer + LR-scheduler state of the stage in progress
                              (None under DeepSpeed, whose ZeRO shards it across ranks)
      rng.pt                  python / numpy / torch (/ cuda) RNG states, one entry per rank
      state.json              global step, stage index, data position, process count
      config.yaml             the resolved recipe
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from visualchat.model import loading

logger = logging.getLogger(__name__)

LATEST_NAME = "latest"
TENSORS_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng.pt"
STATE_NAME = "state.json"
CONFIG_NAME = "config.yaml"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    global_step: int  # optimiser steps done, all stages together
    stage_index: int  # the stage the optimiser state belongs to
    data_position: int  # samples consumed by all ranks together (see training.data)
    num_processes: int  # world size that wrote it
    num_dropped: int = 0  # over-long samples dropped so far


@dataclass
class Checkpoint:
    folder: Path
    state: TrainState
    tensors: dict[str, torch.Tensor]  # trained tensors by parameter name
    optimizer: dict[str, Any] | None  # {"optimizer": ..., "scheduler": ...}; None: DeepSpeed
    rng: list[dict[str, Any]]  # per rank
    config_yaml: str


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # As plain lists, so the file loads with torch.load(weights_only=True).
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()
    ]
    return [p for _, p in sorted(found)]


def find_latest(root: Path) -> Path | None:
    """The folder `latest` names; if that is unreadable, the newest complete checkpoint."""
    pointer = root / LATEST_NAME
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if (folder / STATE_NAME).is_file():
            return folder
        logger.warning("%s names %s, which is not a complete checkpoint", pointer, folder.name)
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def sweep_incomplete(root: Path) -> None:
    """Remove temp folders and files left behind by a run killed while saving."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith((".step-", f".{LATEST_NAME}.")):
            logger.info("removing incomplete checkpoint leftover %s", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_NAME}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_NAME)


def save_checkpoint(
    root: Path,
    state: TrainState,
    tensors: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None,
    rng: list[dict[str, Any]],
    config_yaml: str,
    keep: int,
) -> Path:
    final = root / step_dir_name(state.global_step)
    tmp = loading.atomic_dir(final)
    try:
        save_file(
            {name: t.detach().contiguous().cpu() for name, t in tensors.items()},
            str(tmp / TENSORS_NAME),
        )
        torch.save(optimizer, tmp / OPTIMIZER_NAME)
        torch.save(rng, tmp / RNG_NAME)
        (tmp / CONFIG_NAME).write_text(config_yaml)
        # state.json last: a folder with it is complete (list_checkpoints relies on that).
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=2))
        loading.publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, final.name)
    for old in list_checkpoints(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(folder: Path) -> Checkpoint:
    state = TrainState(**json.loads((folder / STATE_NAME).read_text()))
    return Checkpoint(
        folder=folder,
        state=state,
        tensors=load_file(str(folder / TENSORS_NAME)),
        optimizer=torch.load(folder / OPTIMIZER_NAME, weights_only=True),
        rng=torch.load(folder / RNG_NAME, weights_only=True),
        config_yaml=(folder / CONFIG_NAME).read_text(),
    )
