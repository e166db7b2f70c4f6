"""AdamW with the usual decay split, and the per-stage learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from training.config import StageSpec


def build_optimizer(params: Mapping[str, nn.Parameter], stage: StageSpec) -> torch.optim.AdamW:
    """AdamW over a stage's trainable parameters; biases, norms and other 1-d tensors are not
    decayed. Groups keep the order of `params`, so a saved state loads into a rebuilt one."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": stage.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr)


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
