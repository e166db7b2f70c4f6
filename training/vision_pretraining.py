"""Stage 0 of the embedded recipe: pretrain the small vision tower on synthetic scenes.

Design note. The embedded ViT starts from random weights and has to learn to see colours,
shapes, counts, positions and words from pixels. Learning that only through the language
model's loss is slow on a CPU (every step runs the 135M-parameter LM forward and backward), so
the tower first learns on its own with dense targets the synthetic world knows exactly: for
every patch, which object covers its centre (a colour+shape class, a word class, or background)
and whether an object's centre falls inside it (which makes counting a matter of counting
patches), plus, on every patch of an object, two properties of the object's whole group that
no single patch shows: how many objects the group has, and which region of the image it lies in.
(Without them the token of a star could not say "three stars" or "on the left": the projector
reads one 2 x 2 square of patches at a time, so only the ViT's global attention can gather them.)
Linear heads read the patch tokens; they are thrown away afterwards, and the patch tokens, now
carrying that information, go to the projector. Only training-split scenes
are used, so no held-out scene is ever seen.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from data_blend.sources.scenes import (
    COLOURS,
    MAX_COUNT,
    REGIONS,
    SHAPES,
    WORDS,
    Group,
    Scene,
    generate_scene,
    render,
)
from training.config import Precision
from visualchat.model.vision import VisionTower

logger = logging.getLogger(__name__)

NUM_COMBOS = len(COLOURS) * len(SHAPES)
COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
NUM_COVER_CLASSES = 1 + NUM_COMBOS + len(WORDS)  # background, colour x shape, words
NUM_CENTRE_CLASSES = 1 + NUM_COMBOS  # nothing, or the colour x shape whose centre is here
NUM_COUNT_CLASSES = 1 + max(MAX_COUNT.values())  # no object, or its group's size 1..4
NUM_REGION_CLASSES = 1 + len(REGIONS)  # no object, or its group's region


@dataclass
class VisionPretrainConfig:
    steps: int = 600
    batch_size: int = 48
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    image_size: int = 96
    word_probability: float = 0.5
    # Weight of the group-size and region losses against cover and centre: they are easier
    # (a few classes) and at full weight they took capacity from colour and shape in a
    # 1800-step run (aligned tokens decoded to their colour+shape 46% of the time, against 89%
    # for a tower trained on cover and centre alone).
    group_weight: float = 0.5
    precision: Precision = "fp32"  # or "bf16": autocast, ~1.4x faster on CPUs with avx512_bf16
    seed: int = 0
    log_every: int = 50
    history: list[dict] = field(default_factory=list)  # filled in: step, loss, accuracy

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("vision pretraining steps and batch_size must be positive")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")


def combo_class(colour: str, shape: str) -> int:
    return 1 + COLOUR_INDEX[colour] * len(SHAPES) + SHAPE_INDEX[shape]


def cell_index(x: float, y: float, image_size: int, grid: int) -> int:
    """Row-major index of the grid x grid cell (patch or merged token) holding pixel (x, y)."""
    cell = image_size / grid
    return min(int(y // cell), grid - 1) * grid + min(int(x // cell), grid - 1)


class PatchTargets(NamedTuple):
    """Per-patch class targets, each (grid*grid,) long, row-major like the patches."""

    cover: torch.Tensor  # 0, the colour x shape covering the patch centre, or the word
    centre: torch.Tensor  # 0, or the colour x shape whose object centre lies in the patch
    count: torch.Tensor  # 0, or the size of the group of the object on the patch
    region: torch.Tensor  # 0, or 1 + REGIONS index of that group


def patch_targets(scene: Scene, grid: int) -> PatchTargets:
    cell = scene.image_size / grid
    cover = torch.zeros(grid * grid, dtype=torch.long)
    centre = torch.zeros(grid * grid, dtype=torch.long)
    count = torch.zeros(grid * grid, dtype=torch.long)
    region = torch.zeros(grid * grid, dtype=torch.long)

    def mark(index: int, group: Group) -> None:
        count[index] = group.count
        region[index] = 1 + REGIONS.index(group.region)

    for row in range(grid):
        for col in range(grid):
            x, y = (col + 0.5) * cell, (row + 0.5) * cell
            index = row * grid + col
            if scene.word_box is not None:
                x0, y0, x1, y1 = scene.word_box
                if x0 <= x <= x1 and y0 <= y <= y1:
                    cover[index] = 1 + NUM_COMBOS + WORDS.index(scene.word)
            for group in scene.groups:
                radius = scene.radius(group)
                for px, py in group.positions:
                    if math.hypot(px - x, py - y) <= radius:
                        cover[index] = combo_class(group.colour, group.shape)
                        mark(index, group)
    for group in scene.groups:
        for px, py in group.positions:
            index = cell_index(px, py, scene.image_size, grid)
            centre[index] = combo_class(group.colour, group.shape)
            mark(index, group)
    return PatchTargets(cover, centre, count, region)


class PatchHeads(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.cover = nn.Linear(width, NUM_COVER_CLASSES)
        self.centre = nn.Linear(width, NUM_CENTRE_CLASSES)
        self.count = nn.Linear(width, NUM_COUNT_CLASSES)
        self.region = nn.Linear(width, NUM_REGION_CLASSES)

    def forward(self, tokens: torch.Tensor) -> PatchTargets:
        """Logits (n, patches, classes) per target, in PatchTargets' fields."""
        return PatchTargets(
            self.cover(tokens), self.centre(tokens), self.count(tokens), self.region(tokens)
        )


def scene_batch(
    rng: random.Random,
    batch_size: int,
    image_size: int,
    word_probability: float,
    transform,
    grid: int,
) -> tuple[torch.Tensor, PatchTargets]:
    """`batch_size` fresh training-split scenes: pixels (b, 3, H, W) and their patch targets."""
    pixels, targets = [], []
    for _ in range(batch_size):
        scene = generate_scene(rng, image_size, "train", word_probability=word_probability)
        pixels.append(transform(render(scene)))
        targets.append(patch_targets(scene, grid))
    return torch.stack(pixels), PatchTargets(*(torch.stack(t) for t in zip(*targets, strict=True)))


def dense_loss(logits: PatchTargets, targets: PatchTargets, group_weight: float) -> torch.Tensor:
    """Stage 0's loss: cover and centre on every patch, group size and region (times
    `group_weight`) on the patches that hold an object. Logits (b, patches, classes)."""
    on_object = targets.count > 0  # (b, patches)
    return (
        nn.functional.cross_entropy(logits.cover.flatten(0, 1), targets.cover.flatten())
        + nn.functional.cross_entropy(logits.centre.flatten(0, 1), targets.centre.flatten())
        + group_weight
        * (
            nn.functional.cross_entropy(logits.count[on_object], targets.count[on_object])
            + nn.functional.cross_entropy(logits.region[on_object], targets.region[on_object])
        )
    )


def readout_accuracies(logits: PatchTargets, targets: PatchTargets) -> dict[str, float]:
    """Per-patch argmax accuracies of the four targets, each where it is defined."""
    with torch.no_grad():
        on_object = targets.count > 0
        return {
            "cover_acc_on_objects": _accuracy(logits.cover, targets.cover, targets.cover > 0),
            "centre_acc": _accuracy(logits.centre, targets.centre, torch.ones_like(on_object)),
            "centre_acc_on_centres": _accuracy(logits.centre, targets.centre, targets.centre > 0),
            "count_acc_on_objects": _accuracy(logits.count, targets.count, on_object),
            "region_acc_on_objects": _accuracy(logits.region, targets.region, on_object),
        }


def pretrain_vision(
    vision: VisionTower,
    cfg: VisionPretrainConfig,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `vision` in place; returns the logged history (loss, per-patch accuracies)."""
    grid = math.isqrt(vision.num_patches)
    if grid * grid != vision.num_patches or vision.image_size[0] != cfg.image_size:
        raise ValueError(
            f"vision pretraining needs a square patch grid at {cfg.image_size} px, the tower has "
            f"{vision.num_patches} patches at {vision.image_size}"
        )
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    heads = PatchHeads(vision.hidden_size)
    params = [p for p in vision.parameters()] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    transform = vision.image_transform()
    vision.train()
    started = time.perf_counter()
    history: list[dict] = []
    for step in range(cfg.steps):
        pixels, targets = scene_batch(
            rng, cfg.batch_size, cfg.image_size, cfg.word_probability, transform, grid
        )  # targets: (b, patches) each
        # SDPA's math backend: at 65 tokens per image torch's CPU flash-attention backward is
        # slow (4 heads of 48 x 65 x 64, forward + backward: flash 26.6 ms, math 11.1 ms).
        with (
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"),
            sdpa_kernel(SDPBackend.MATH),
        ):
            tokens = vision(pixels)  # (b, patches, width)
            logits = PatchTargets(*(t.float() for t in heads(tokens)))
        loss = dense_loss(logits, targets, cfg.group_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            entry = {
                "stage": "vision_pretrain",
                "step": step + 1,
                "loss": float(loss),
                **readout_accuracies(logits, targets),
                "seconds": time.perf_counter() - started,
            }
            history.append(entry)
            logger.info("vision pretrain %s", entry)
            if on_log is not None:
                on_log(entry)
    vision.eval()
    cfg.history = history
    return history


def _accuracy(logits: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> float:
    """Argmax accuracy of (b, patches, classes) logits against (b, patches) targets where set."""
    return float((logits.argmax(-1)[where] == target[where]).float().mean())


def main(argv: list[str] | None = None) -> int:
    """`python -m training.vision_pretraining --out runs/embedded/vision.safetensors`: pretrain
    the embedded default's ViT and save its weights (atomically) with the loss history."""
    import argparse
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    from visualchat.model.loading import EMBEDDED_SEED, EMBEDDED_VISION

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=VisionPretrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=VisionPretrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=VisionPretrainConfig.lr)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(EMBEDDED_SEED)
    vision = VisionTower(type(EMBEDDED_VISION)(custom=dict(EMBEDDED_VISION.custom)))
    cfg = VisionPretrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision
    )
    history = pretrain_vision(vision, cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, str(tmp))
    os.replace(tmp, out)
    log = out.with_suffix(".history.json")
    log.write_text(json.dumps(history, indent=2) + "\n")
    print(f"wrote {out} ({history[-1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
