"""AdamW groups (decay split, per-group learning rates) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.config import StageSpec
from training.optim import build_optimizer, build_scheduler, warmup_cosine


def named_params() -> dict[str, nn.Parameter]:
    """Parameters named as in a VisualChatModel: two of each trainable group, 2-d and 1-d."""
    shapes = {
        "vision.blocks.0.weight": (4, 4),
        "vision.blocks.0.bias": (4,),
        "projector.fc.weight": (4, 4),
        "projector.fc.bias": (4,),
        "language_model.layers.0.q_proj.lora_A.default.weight": (2, 4),
        "language_model.layers.0.q_proj.lora_B.default.weight": (4, 2),
    }
    return {name: nn.Parameter(torch.randn(shape)) for name, shape in shapes.items()}


def stage(**changes) -> StageSpec:
    spec = {"name": "chat", "trainable": ["vision", "projector", "lora"], "steps": 100}
    return StageSpec(**{**spec, "lr": 1e-3, "weight_decay": 0.01, **changes})


def lr_and_decay_of(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]):
    """name -> (lr, weight_decay) of the optimizer group holding that parameter."""
    found = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = next(n for n, p in params.items() if p is param)
            found[name] = (group["lr"], group["weight_decay"])
    return found


def test_without_lr_scale_one_decayed_group_then_one_undecayed() -> None:
    params = named_params()
    optimizer = build_optimizer(params, stage())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]
    assert [len(g["params"]) for g in optimizer.param_groups] == [4, 2]


def test_lr_scale_gives_a_group_its_own_rate_and_keeps_the_decay_split() -> None:
    params = named_params()
    found = lr_and_decay_of(build_optimizer(params, stage(lr_scale={"vision": 0.1})), params)
    assert found["vision.blocks.0.weight"] == (pytest.approx(1e-4), 0.01)
    assert found["vision.blocks.0.bias"] == (pytest.approx(1e-4), 0.0)
    assert found["projector.fc.weight"] == (1e-3, 0.01)
    assert found["projector.fc.bias"] == (1e-3, 0.0)
    lora = "language_model.layers.0.q_proj.lora_B.default.weight"
    assert found[lora] == (1e-3, 0.01)


def test_the_schedule_scales_every_group_from_its_own_rate() -> None:
    params = named_params()
    spec = stage(lr_scale={"vision": 0.1}, warmup_steps=2)
    optimizer = build_optimizer(params, spec)
    scheduler = build_scheduler(optimizer, spec)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    found = lr_and_decay_of(optimizer, params)
    vision, projector = found["vision.blocks.0.weight"][0], found["projector.fc.weight"][0]
    assert vision == pytest.approx(0.1 * projector)
    assert projector == pytest.approx(1e-3 * warmup_cosine(2, 100)(10))


def test_a_saved_state_loads_into_a_rebuilt_optimizer() -> None:
    params = named_params()
    spec = stage(lr_scale={"vision": 0.1, "lora": 2.0})
    optimizer = build_optimizer(params, spec)
    for param in params.values():
        param.grad = torch.ones_like(param)
    optimizer.step()
    rebuilt = build_optimizer(params, spec)
    rebuilt.load_state_dict(optimizer.state_dict())
    for old, new in zip(optimizer.param_groups, rebuilt.param_groups, strict=True):
        assert [id(p) for p in old["params"]] == [id(p) for p in new["params"]]
        assert old["lr"] == new["lr"]
    first = params["vision.blocks.0.weight"]
    assert torch.equal(rebuilt.state[first]["exp_avg"], optimizer.state[first]["exp_avg"])


def test_warmup_then_cosine_to_zero() -> None:
    factor = warmup_cosine(4, 104)
    assert factor(0) == pytest.approx(1 / 5)
    assert factor(3) == pytest.approx(4 / 5)
    assert factor(4) == 1.0
    assert factor(54) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert factor(104) == pytest.approx(0.0)
    assert factor(500) == pytest.approx(0.0)
