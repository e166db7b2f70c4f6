"""The DeepSpeed ZeRO-2 config and the accelerate config that points at it carry the keys
accelerate and DeepSpeed need (DeepSpeed itself is not installed here)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils.deepspeed import HfDeepSpeedConfig

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "training" / "deepspeed"


def test_zero2_json() -> None:
    config = json.loads((FOLDER / "zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    # Filled per stage by the trainer / by accelerate from the recipe.
    for key in ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu"):
        assert config[key] == "auto", key
    assert config["bf16"] == {"enabled": "auto"}
    assert config["fp16"]["enabled"] is False
    assert isinstance(config["gradient_clipping"], float)
    assert "optimizer" not in config and "scheduler" not in config  # ours: AdamW + LambdaLR
    parsed = HfDeepSpeedConfig(str(FOLDER / "zero2.json"))
    assert parsed.is_zero2() and not parsed.is_zero3() and not parsed.is_offload()


def test_accelerate_yaml_points_at_zero2() -> None:
    config = yaml.safe_load((FOLDER / "accelerate_zero2.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED"
    deepspeed = config["deepspeed_config"]
    assert (REPO / deepspeed["deepspeed_config_file"]).resolve() == FOLDER / "zero2.json"
    # accelerate refuses these next to a deepspeed_config_file (they belong in the JSON).
    refused = {"mixed_precision", "gradient_accumulation_steps", "gradient_clipping", "zero_stage"}
    assert not refused & (set(config) | set(deepspeed))
    assert config["num_processes"] >= 1 and config["num_machines"] == 1
    assert config["use_cpu"] is False
    # accelerate's own reader accepts it (unknown keys would raise) and sees no precision.
    cluster = load_config_from_file(str(FOLDER / "accelerate_zero2.yaml"))
    assert str(cluster.distributed_type) == "DistributedType.DEEPSPEED"
    assert cluster.mixed_precision is None
