"""`accelerate launch --multi_gpu --num_processes 2 -m training.main recipe.yaml` with
ACCELERATE_USE_CPU=1: two CPU processes, DDP over gloo. (`launch --cpu --num_processes 2`
starts a single process in accelerate 1.15 unless mpirun is installed.)

Two processes with batch_size b read, between them, exactly the samples one process with
batch_size 2b reads, and the loss is normalised by the label tokens of the whole step on all
ranks, so both runs train the same weights (up to float summation order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_fixtures import recipe_dict

from training.checkpoint import find_latest
from training.config import TrainConfig
from training.model_init import named_group_tensors
from training.run_log import read_log
from training.trainer import run_training

REPO = Path(__file__).resolve().parents[2]


STAGES = [
    {"name": "projector", "trainable": ["projector"], "steps": 2, "lr": 5e-3},
    {
        "name": "lora",
        "trainable": ["lora", "projector"],
        "steps": 2,
        "lr": 5e-3,
        "grad_accum": 2,  # no_sync on the first micro-batch under DDP
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]},
    },
]


def stages(batch_size: int) -> list[dict]:
    return [dict(stage, batch_size=batch_size) for stage in STAGES]


def test_two_process_cpu_run_matches_one_process(tmp_path, backbone_dir, train_dir) -> None:
    recipe = recipe_dict(backbone_dir, train_dir, tmp_path / "ddp", stages=stages(2))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # with ACCELERATE_USE_CPU=1: torchrun, 2 CPU processes over gloo
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "0",  # a free port
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "training.main",
        str(path),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        ACCELERATE_USE_CPU="1",
        CUDA_VISIBLE_DEVICES="",
    )
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    out = tmp_path / "ddp"
    assert sorted(p.name for p in (out / "final").iterdir()) == [
        "adapter",
        "model.safetensors",
        "visualchat_config.json",
    ]
    train = [r for r in read_log(out / "log.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # the main process logs, once per step
    latest = find_latest(out / "checkpoints")
    state = json.loads((latest / "state.json").read_text())
    # 2 steps x 2 samples x 2 ranks, then 2 steps x 2 micro-batches x 2 samples x 2 ranks
    assert state == {
        "global_step": 4,
        "stage_index": 1,
        "data_position": 24,
        "num_processes": 2,
        "num_dropped": 0,
    }
    assert len(torch.load(latest / "rng.pt", weights_only=True)) == 2  # one per rank

    single = run_training(
        TrainConfig.from_dict(
            recipe_dict(backbone_dir, train_dir, tmp_path / "one", stages=stages(4))
        )
    )
    expected = {
        k: v.detach() for k, v in named_group_tensors(single.model, ["projector", "lora"]).items()
    }
    actual = load_file(str(latest / "trainable.safetensors"))
    assert set(actual) == set(expected)
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    one = [r["loss"] for r in read_log(tmp_path / "one" / "log.jsonl") if r["type"] == "train"]
    assert [r["loss"] for r in train] == pytest.approx(one, rel=1e-5)
