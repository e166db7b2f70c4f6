"""AdamW with the usual decay split, and the per-stage learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from training.config import StageSpec
from training.model_init import group_of


def build_optimizer(params: Mapping[str, nn.Parameter], stage: StageSpec) -> torch.optim.AdamW:
    """AdamW over a stage's trainable parameters; biases, norms and other 1-d tensors are not
    decayed; a trainable group named in stage.lr_scale gets its own learning rate. Param groups
    are formed in a fixed order from the order of `params`, so a saved state loads into a
    rebuilt optimizer."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in params.items():
        scale = stage.lr_scale.get(group_of(name) or "", 1.0)
        groups.setdefault((scale, param.ndim >= 2), []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": members,
                "lr": stage.lr * scale,
                "weight_decay": stage.weight_decay if decayed else 0.0,
            }
            for (scale, decayed), members in sorted(
                groups.items(), key=lambda g: (-g[0][0], not g[0][1])
            )
        ],
        lr=stage.lr,
    )


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier at optimiser step `step` (0-based): linear warm-up from 1/(warmup+1) to 1
    over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage: StageSpec
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(stage.warmup_steps, stage.steps)
    )
