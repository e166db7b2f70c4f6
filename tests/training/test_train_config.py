"""Recipes: YAML round trip, defaults, and the validation messages users act on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from training.config import LoraSpec, TrainConfig

BASE = {
    "model": {"init": "embedded", "attention": "mmca"},
    "data": {"train": "blend/train", "eval": "blend/eval", "max_length": 512},
    "stages": [
        {"name": "projector", "trainable": ["projector"], "steps": 10, "lr": 1e-3},
        {
            "name": "lora",
            "trainable": ["lora", "projector"],
            "steps": 20,
            "lr": 2e-4,
            "batch_size": 4,
            "grad_accum": 2,
            "warmup_steps": 5,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]},
        },
    ],
    "run": {"output_dir": "runs/x", "seed": 3},
}


def with_change(path: str, value) -> dict:
    """BASE with one key replaced (value None deletes it); path like 'stages.0.lr'."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


def test_yaml_round_trip_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = TrainConfig.from_yaml(path)
    assert [s.name for s in config.stages] == ["projector", "lora"]
    first, second = config.stages
    assert (first.batch_size, first.grad_accum, first.kind, first.lora) == (8, 1, "lm", None)
    assert (second.batch_size, second.grad_accum, second.warmup_steps) == (4, 2, 5)
    assert second.lora == LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    assert config.lora == second.lora
    assert config.total_steps == 30
    assert config.run.precision == "fp32" and config.run.keep_checkpoints == 2
    assert config.output_dir == Path("runs/x")
    again = tmp_path / "again.yaml"
    again.write_text(config.to_yaml())
    assert TrainConfig.from_yaml(again) == config


def test_yaml_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # PyYAML reads `1e-3` as the string "1e-3" (YAML 1.1 wants `1.0e-3`); recipes say 1e-3.
    text = yaml.safe_dump(BASE).replace("lr: 0.001", "lr: 1e-3")
    assert "lr: 1e-3" in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert TrainConfig.from_yaml(path).stages[0].lr == 1e-3


def test_lora_defaults_when_no_block_is_given() -> None:
    data = with_change("stages.1.lora", None)
    assert TrainConfig.from_dict(data).lora == LoraSpec()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("stages.0.trainable", ["projector", "backbone"], r"cannot train \['backbone'\]"),
        ("stages.0.trainable", [], "trainable must be a non-empty list"),
        ("stages.0.trainable", "projector", "trainable must be a non-empty list"),
        ("stages.0.steps", 0, "steps must be a positive integer, got 0"),
        ("stages.0.lr", -1.0, "lr must be a positive number"),
        ("stages.0.lr", 0, "lr must be a positive number"),
        ("stages.0.lr", "fast", "lr must be a positive number, got 'fast'"),
        ("stages.0.batch_size", 1.5, "batch_size must be a positive integer"),
        ("stages.0.warmup_steps", 11, r"warmup_steps \(11\) exceeds steps \(10\)"),
        ("stages.0.kind", "vision_pretrain", "unknown kind 'vision_pretrain'.*register_stage_kind"),
        ("stages.0.lr_rate", 1.0, r"stages\[0\]: unknown key\(s\) \['lr_rate'\]"),
        ("stages.0.lr", None, r"stages\[0\]: missing required key\(s\) \['lr'\]"),
        ("stages.0.lora", {"r": 4}, "has a lora block but does not train lora"),
        ("stages.1.lora.r", 0, "lora.r must be a positive integer"),
        ("stages.1.lora.target_modules", [], "target_modules must be a non-empty list"),
        ("stages.1.lora.dropout", 1.0, r"lora.dropout must be in \[0, 1\)"),
        ("stages.1.name", "projector", "stage names must be unique"),
        ("stages.0.lr_scale", {"vision": 0.1}, "lr_scale names 'vision', which this stage does"),
        ("stages.1.lr_scale", {"lora": 0}, "lr_scale.lora must be a positive number"),
        ("stages.1.lr_scale", {"lora": "1e-1"}, None),  # valid: YAML's dotless exponent
        ("stages.1.lr_scale", [0.1], "lr_scale must map trainable groups to multipliers"),
        ("stages", [], "at least one stage"),
        ("model.attention", "flash", "model.attention must be 'mmca' or 'causal'"),
        ("model.dtype", "int8", "model.dtype must be float32, bfloat16 or float16"),
        ("model.init", "pkg.mod:make", None),  # valid: a factory
        ("model.factory_kwargs", {"seed": 1}, "factory_kwargs is only used with"),
        ("data.max_length", 0, "data.max_length must be a positive integer"),
        ("data.train", None, r"data: missing required key\(s\) \['train'\]"),
        ("run.precision", "fp16", "run.precision must be 'fp32' or 'bf16'"),
        ("run.frozen_weights_bf16", True, "frozen_weights_bf16 needs run.precision: bf16"),
        ("run.compile", True, None),  # valid without bf16
        ("run.keep_checkpoints", 0, "run.keep_checkpoints must be a positive integer"),
        ("run.save_every", -1, "run.save_every must be a non-negative integer"),
        ("run", None, r"recipe: missing required key\(s\) \['run'\]"),
        ("extra", 1, r"recipe: unknown key\(s\) \['extra'\]"),
    ],
)
def test_validation_messages(path: str, value, message: str | None) -> None:
    data = with_change(path, value)
    if message is None:
        TrainConfig.from_dict(data)
        return
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data)


def test_two_different_lora_blocks_are_refused() -> None:
    data = copy.deepcopy(BASE)
    data["stages"].append(
        {
            "name": "more",
            "trainable": ["lora"],
            "steps": 1,
            "lr": 1e-4,
            "lora": {"r": 8, "target_modules": ["q_proj"]},
        }
    )
    with pytest.raises(ValueError, match="must give the same one"):
        TrainConfig.from_dict(data)


def test_factory_init_refuses_vision_overrides() -> None:
    data = with_change("model.init", "pkg.mod:make")
    data["model"]["vision"] = {"custom": {"image_size": 32}}
    with pytest.raises(ValueError, match="do not apply to a factory init"):
        TrainConfig.from_dict(data)


def test_from_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_change("stages.0.steps", -2)))
    with pytest.raises(ValueError, match=r"bad\.yaml: stage 'projector': steps"):
        TrainConfig.from_yaml(path)


def test_the_shipped_recipes_parse() -> None:
    recipes = sorted((Path(__file__).resolve().parents[2] / "training" / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        config = TrainConfig.from_yaml(path)
        assert config.model.init in ("embedded", "training.embedded:build_embedded")
        assert config.model.base_backbone in (None, "embedded") and config.total_steps > 0


def test_visualchat_train_reports_a_bad_recipe(tmp_path, capsys) -> None:
    from visualchat.cli import main as cli_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {}\n")
    assert cli_main(["train", str(bad)]) == 2
    assert "error:" in capsys.readouterr().err


def test_overrides_set_nested_values_list_items_and_refuse_bad_paths() -> None:
    from training.config import apply_override

    data = {"model": {"attention": "mmca"}, "stages": [{"steps": 3}], "run": {}}
    apply_override(data, "model.attention=causal")
    apply_override(data, "stages.0.steps=60")
    apply_override(data, "run.output_dir=runs/x")
    apply_override(data, "model.factory_kwargs.attention=causal")  # creates the section
    assert data == {
        "model": {"attention": "causal", "factory_kwargs": {"attention": "causal"}},
        "stages": [{"steps": 60}],
        "run": {"output_dir": "runs/x"},
    }
    for bad in ("model.attention", "stages.3.steps=1", "stages.x=1", "model.attention.x=1", "=1"):
        with pytest.raises(ValueError, match="override"):
            apply_override(data, bad)


@pytest.mark.parametrize("recipe", sorted(Path("training/recipes").glob("*.yaml")), ids=str)
def test_shipped_recipes_parse_and_name_an_importable_init(recipe: Path) -> None:
    import importlib

    config = TrainConfig.from_yaml(recipe)
    assert config.stages and all(stage.steps > 0 for stage in config.stages)
    if ":" in config.model.init:  # "package.module:function", else a built-in name
        module, name = config.model.init.split(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_lr_scale_is_parsed_to_floats_and_round_trips(tmp_path: Path) -> None:
    config = TrainConfig.from_dict(with_change("stages.1.lr_scale", {"projector": "5e-1"}))
    assert config.stages[1].lr_scale == {"projector": 0.5}
    assert config.stages[0].lr_scale == {}
    path = tmp_path / "recipe.yaml"
    path.write_text(config.to_yaml())
    assert TrainConfig.from_yaml(path).stages[1].lr_scale == {"projector": 0.5}
