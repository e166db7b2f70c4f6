"""A run SIGKILLed at any moment resumes from its last complete checkpoint and ends exactly
where an uninterrupted run ends: same trained tensors, same loss at every step."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from training_fixtures import recipe_dict

from training import checkpoint, stages
from training.checkpoint import find_latest, list_checkpoints
from training.config import TrainConfig
from training.model_init import named_group_tensors
from training.run_log import read_log
from training.trainer import run_training

GROUPS = ["projector", "lora"]
# 2 stages x 4 steps, a checkpoint every 2 steps: steps 2, 4 (stage end), 6 and 8.
STAGES = [
    {"name": "projector", "trainable": ["projector"], "steps": 4, "lr": 5e-3},
    {
        "name": "lora",
        "trainable": ["lora", "projector"],
        "steps": 4,
        "lr": 5e-3,
        "warmup_steps": 1,
        "grad_accum": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["q_proj", "v_proj"]},
    },
]


def recipe(tmp: Path, backbone_dir, train_dir, eval_dir, name: str) -> TrainConfig:
    data = recipe_dict(
        backbone_dir,
        train_dir,
        tmp / name,
        eval_dir,
        stages=[dict(s) for s in STAGES],
        save_every=2,
        eval_every=3,
        eval_accuracy=False,
    )
    return TrainConfig.from_dict(data)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, backbone_dir, train_dir, eval_dir):
    tmp = tmp_path_factory.mktemp("resume")
    config = recipe(tmp, backbone_dir, train_dir, eval_dir, "uninterrupted")
    result = run_training(config)
    return config, result


def _child(config: TrainConfig, sleep: float, hang_on_save: int, marker: Path | None) -> None:
    """The killed run, in a forked child (no re-import: the test stays fast). Hooks slow it
    down (--sleep) or stop it inside a checkpoint write; the parent then SIGKILLs it."""
    if sleep:
        lm = stages.STAGE_KINDS["lm"]

        def slow_loss(model, batch):
            time.sleep(sleep)
            return lm.loss(model, batch)

        stages.STAGE_KINDS["lm"] = dataclasses.replace(lm, loss=slow_loss)
    if hang_on_save:
        save_file, calls = checkpoint.save_file, [0]

        def hanging_save_file(tensors, path, *rest, **kwargs):
            save_file(tensors, path, *rest, **kwargs)  # tensors on disk, the rest not yet
            calls[0] += 1
            if calls[0] == hang_on_save:
                marker.write_text(str(path))
                time.sleep(600)

        checkpoint.save_file = hanging_save_file
    run_training(config)


def start(
    config: TrainConfig, sleep: float = 0.0, hang_on_save: int = 0, marker: Path | None = None
) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("fork").Process(
        target=_child, args=(config, sleep, hang_on_save, marker), daemon=True
    )
    process.start()
    return process


def wait_for(path: Path, process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not process.is_alive():
            raise AssertionError(f"the run exited early with code {process.exitcode}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def kill(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=30)
    assert process.exitcode == -signal.SIGKILL


def assert_same_run(resumed, resumed_config, uninterrupted) -> None:
    config, result = uninterrupted
    expected = named_group_tensors(result.model, GROUPS)
    actual = named_group_tensors(resumed.model, GROUPS)
    assert set(actual) == set(expected)
    for name, value in actual.items():
        assert torch.equal(value, expected[name]), name

    # The log reads as one run: each step once, with the uninterrupted run's losses.
    def steps(cfg):
        return [
            (r["type"], r["step"], r.get("loss", r.get("eval_loss")))
            for r in read_log(cfg.output_dir / "log.jsonl")
        ]

    assert steps(resumed_config) == steps(config)
    assert [r[1] for r in steps(config) if r[0] == "train"] == list(range(1, 9))
    assert [r[1] for r in steps(config) if r[0] == "eval"] == [3, 6, 8]


def test_kill_after_the_first_checkpoint_then_resume(
    tmp_path, backbone_dir, train_dir, eval_dir, uninterrupted
) -> None:
    config = recipe(tmp_path, backbone_dir, train_dir, eval_dir, "killed")
    child = start(config, sleep=0.1)
    wait_for(config.output_dir / "checkpoints" / "latest", child)
    kill(child)
    assert not (config.output_dir / "final").exists()  # it really was cut short
    first = find_latest(config.output_dir / "checkpoints")
    assert first is not None and first.name in ("step-000002", "step-000004")

    resumed = run_training(config, resume=True)
    assert resumed.global_step == 8
    assert_same_run(resumed, config, uninterrupted)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(
    tmp_path, backbone_dir, train_dir, eval_dir, uninterrupted
) -> None:
    config = recipe(tmp_path, backbone_dir, train_dir, eval_dir, "killed_mid_write")
    marker = tmp_path / "writing"
    child = start(config, hang_on_save=4, marker=marker)
    wait_for(marker, child)  # the last checkpoint (step 8) is half written
    kill(child)
    root = config.output_dir / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".step-000008")]
    assert len(partial) == 1 and (partial[0] / "trainable.safetensors").is_file()
    assert not (root / "step-000008").exists()
    assert (root / "latest").read_text() == "step-000006\n"
    assert [p.name for p in list_checkpoints(root)] == ["step-000004", "step-000006"]
    saved = yaml.safe_load((root / "step-000006" / "config.yaml").read_text())
    assert saved["run"]["output_dir"] == str(config.output_dir)

    # Resuming inside the LoRA stage restores its optimizer state and the RNG that its LoRA
    # dropout draws from; the remaining steps must match the uninterrupted run bit for bit.
    resumed = run_training(config, resume=True)
    assert not partial[0].exists()  # swept on start
    assert [p.name for p in list_checkpoints(root)] == ["step-000006", "step-000008"]
    assert_same_run(resumed, config, uninterrupted)
