"""Stage 0 of the embedded recipe: pretrain the small vision tower on synthetic scenes.

Design note. The embedded ViT starts from random weights and has to learn to see colours,
shapes, counts, positions and words from pixels. Learning that only through the language
model's loss is slow on a CPU (every step runs the 135M-parameter LM forward and backward), so
the tower first learns on its own with dense targets the synthetic world knows exactly: for
every patch, which object covers its centre (a colour+shape class, a word class, or background)
and whether an object's centre falls inside it (which makes counting a matter of counting
patches). Two linear heads read the patch tokens; they are thrown away afterwards, and the
patch tokens, now carrying that information, go to the projector. Only training-split scenes
are used, so no held-out scene is ever seen.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from data_blend.sources.scenes import COLOURS, SHAPES, WORDS, Scene, generate_scene, render
from visualchat.model.vision import VisionTower

logger = logging.getLogger(__name__)

NUM_COMBOS = len(COLOURS) * len(SHAPES)
COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
NUM_COVER_CLASSES = 1 + NUM_COMBOS + len(WORDS)  # background, colour x shape, words
NUM_CENTRE_CLASSES = 1 + NUM_COMBOS  # nothing, or the colour x shape whose centre is here


@dataclass
class VisionPretrainConfig:
    steps: int = 600
    batch_size: int = 48
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    image_size: int = 96
    word_probability: float = 0.5
    seed: int = 0
    log_every: int = 50
    history: list[dict] = field(default_factory=list)  # filled in: step, loss, accuracy

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("vision pretraining steps and batch_size must be positive")


def combo_class(colour: str, shape: str) -> int:
    return 1 + COLOUR_INDEX[colour] * len(SHAPES) + SHAPE_INDEX[shape]


def cell_index(x: float, y: float, image_size: int, grid: int) -> int:
    """Row-major index of the grid x grid cell (patch or merged token) holding pixel (x, y)."""
    cell = image_size / grid
    return min(int(y // cell), grid - 1) * grid + min(int(x // cell), grid - 1)


def patch_targets(scene: Scene, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid*grid,) cover classes and (grid*grid,) centre classes, row-major like the patches."""
    cell = scene.image_size / grid
    cover = torch.zeros(grid * grid, dtype=torch.long)
    centre = torch.zeros(grid * grid, dtype=torch.long)
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
    for group in scene.groups:
        for px, py in group.positions:
            centre[cell_index(px, py, scene.image_size, grid)] = combo_class(
                group.colour, group.shape
            )
    return cover, centre


class PatchHeads(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.cover = nn.Linear(width, NUM_COVER_CLASSES)
        self.centre = nn.Linear(width, NUM_CENTRE_CLASSES)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cover(tokens), self.centre(tokens)  # (n, patches, classes) each


def _batch(
    rng: random.Random, cfg: VisionPretrainConfig, transform, grid: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels, covers, centres = [], [], []
    for _ in range(cfg.batch_size):
        scene = generate_scene(rng, cfg.image_size, "train", word_probability=cfg.word_probability)
        pixels.append(transform(render(scene)))
        cover, centre = patch_targets(scene, grid)
        covers.append(cover)
        centres.append(centre)
    return torch.stack(pixels), torch.stack(covers), torch.stack(centres)


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
        pixels, cover, centre = _batch(rng, cfg, transform, grid)
        tokens = vision(pixels)  # (b, patches, width)
        cover_logits, centre_logits = heads(tokens)
        loss = nn.functional.cross_entropy(
            cover_logits.flatten(0, 1), cover.flatten()
        ) + nn.functional.cross_entropy(centre_logits.flatten(0, 1), centre.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            with torch.no_grad():
                objects = cover > 0
                entry = {
                    "stage": "vision_pretrain",
                    "step": step + 1,
                    "loss": float(loss),
                    "cover_acc_on_objects": float(
                        (cover_logits.argmax(-1)[objects] == cover[objects]).float().mean()
                    ),
                    "centre_acc": float((centre_logits.argmax(-1) == centre).float().mean()),
                    "seconds": time.perf_counter() - started,
                }
            history.append(entry)
            logger.info("vision pretrain %s", entry)
            if on_log is not None:
                on_log(entry)
    vision.eval()
    cfg.history = history
    return history


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(EMBEDDED_SEED)
    vision = VisionTower(type(EMBEDDED_VISION)(custom=dict(EMBEDDED_VISION.custom)))
    cfg = VisionPretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
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
