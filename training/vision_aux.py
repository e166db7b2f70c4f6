"""Keeping the tower's stage-0 knowledge while stage 1 tunes it: an auxiliary dense loss.

Design note. Stage 0 (training.vision_pretraining) teaches the embedded ViT, on every patch,
what covers it, where object centres are, and each object's group size and region. When stage 1
then tunes the tower through the language model's answer loss, the answers' gradient wears some
of that away: after 520 steps at a tenth of the learning rate the tokens read back their group
size 83% of the time instead of 94%, and counting answers fell 66 -> 52% (README, "The embedded
default"). This module adds stage 0's loss back into every stage-1 step, on a small batch of
fresh training-split scenes, so the tower is free to move where the answers want it to as long as
what stage 0 taught stays readable.

The read-out is four linear heads (training.vision_pretraining.PatchHeads) fitted, with the
tower frozen, to the tower as the stage starts (stage 0 threw its own heads away), and then kept
fixed: the auxiliary loss only moves the tower, towards features the same linear read-out still
decodes. The fitted heads are written once to the run folder, so a resumed run uses the very
heads its first start fitted. The scenes of step s are drawn from a generator seeded by (seed,
s): a resumed run sees the same scenes at the same steps.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from training.config import VisionAuxSpec
from training.vision_pretraining import (
    PatchHeads,
    PatchTargets,
    dense_loss,
    readout_accuracies,
    scene_batch,
)
from visualchat.model.vision import VisionTower

logger = logging.getLogger(__name__)

HEADS_FILE = "vision_aux_heads.safetensors"


class VisionAux:
    """The fixed read-out heads and the per-step auxiliary loss of one stage."""

    def __init__(self, heads: PatchHeads, spec: VisionAuxSpec, seed: int, precision: str) -> None:
        self.heads = heads.requires_grad_(False)
        self.spec = spec
        self.seed = seed
        self.bf16 = precision == "bf16"

    @classmethod
    def prepare(
        cls, vision: VisionTower, spec: VisionAuxSpec, seed: int, precision: str, run_dir: Path
    ) -> VisionAux:
        """Load the run's fitted heads, or fit them to `vision` as it is now and save them."""
        path = Path(run_dir) / HEADS_FILE
        with torch.random.fork_rng(devices=[]):  # the run's own RNG stream stays untouched
            torch.manual_seed(seed)
            heads = PatchHeads(vision.hidden_size)
        heads.to(next(vision.parameters()).device)
        if path.exists():
            heads.load_state_dict(load_file(str(path)))
            logger.info("vision aux: read-out heads from %s", path)
            return cls(heads, spec, seed, precision)
        aux = cls(heads, spec, seed, precision)
        metrics = aux.fit_heads(vision)
        logger.info("vision aux: read-out heads fitted to the starting tower: %s", metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp))
        os.replace(tmp, path)  # atomic: a kill leaves no half-written heads
        return aux

    def fit_heads(self, vision: VisionTower) -> dict[str, float]:
        """Train the heads alone on the frozen tower's tokens; returns the last batch's loss
        and per-patch accuracies."""
        spec = self.spec
        rng = random.Random(f"vision-aux-probe-{self.seed}")
        params = list(self.heads.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=spec.probe_lr)
        was_training = vision.training
        vision.eval()
        metrics: dict[str, float] = {}
        for step in range(spec.probe_steps):
            pixels, targets = self._scenes(vision, rng, spec.probe_batch_size)
            with torch.no_grad():
                tokens = self._tokens(vision, pixels)  # (b, patches, width)
            logits = PatchTargets(*(t.float() for t in self.heads(tokens.float())))
            loss = dense_loss(logits, targets, spec.group_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step + 1 == spec.probe_steps:
                metrics = {"loss": float(loss.detach()), **readout_accuracies(logits, targets)}
        optimizer.zero_grad(set_to_none=True)  # no stale gradients left on fixed heads
        vision.train(was_training)
        self.heads.requires_grad_(False)
        return metrics

    def loss(self, vision: VisionTower, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The dense loss of optimiser step `step`'s scenes through `vision` (with grad), and
        its per-patch read-out accuracies."""
        rng = random.Random(f"vision-aux-{self.seed}-{step}")
        pixels, targets = self._scenes(vision, rng, self.spec.batch_size)
        tokens = self._tokens(vision, pixels)  # (b, patches, width)
        logits = PatchTargets(*(t.float() for t in self.heads(tokens.float())))
        return dense_loss(logits, targets, self.spec.group_weight), readout_accuracies(
            logits, targets
        )

    def _scenes(
        self, vision: VisionTower, rng: random.Random, batch_size: int
    ) -> tuple[torch.Tensor, PatchTargets]:
        grid = math.isqrt(vision.num_patches)
        device = next(vision.parameters()).device
        pixels, targets = scene_batch(
            rng,
            batch_size,
            vision.image_size[0],
            self.spec.word_probability,
            vision.image_transform(),
            grid,
        )
        return pixels.to(device), PatchTargets(*(t.to(device) for t in targets))

    def _tokens(self, vision: VisionTower, pixels: torch.Tensor) -> torch.Tensor:
        # The math SDPA backend, as in stage 0: faster backward at 65 tokens per image on CPU.
        with (
            torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=self.bf16),
            sdpa_kernel(SDPBackend.MATH),
        ):
            return vision(pixels)


def compare_towers(
    reference: VisionTower,
    towers: dict[str, VisionTower],
    spec: VisionAuxSpec,
    batches: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Fit the fixed heads to `reference`, then read every tower (the reference first) through
    them on the same `batches` x spec.batch_size held-back scene draws: the mean dense loss and
    per-patch accuracies. How much of what stage 0 taught a tuned tower still shows the way
    stage 0 left it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        aux = VisionAux.prepare(reference, spec, seed, "fp32", Path(folder))
    results = {}
    for name, tower in {"reference": reference, **towers}.items():
        tower.eval()
        with torch.no_grad():
            # Steps far past any run's length: scenes the fitting never drew.
            draws = [aux.loss(tower, 1_000_000 + i) for i in range(batches)]
        metrics = {"loss": sum(float(loss) for loss, _ in draws) / batches}
        for key in draws[0][1]:
            metrics[key] = sum(acc[key] for _, acc in draws) / batches
        results[name] = metrics
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m training.vision_aux --reference runs/stage0/vision.safetensors tuned=F ...`:
    read tuned towers through linear heads fitted to the reference tower (stage 0's read-out)."""
    import argparse

    from visualchat.atomic import atomic_write_json
    from visualchat.model.loading import EMBEDDED_VISION

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="the stage-0 tower (safetensors)")
    parser.add_argument("towers", nargs="+", help="NAME=tower.safetensors")
    parser.add_argument("--batches", type=int, default=8, help="of 48 scenes each")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def load(path: str) -> VisionTower:
        tower = VisionTower(type(EMBEDDED_VISION)(custom=dict(EMBEDDED_VISION.custom)))
        tower.load_state_dict(load_file(path))
        return tower

    towers = {}
    for item in args.towers:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"expected NAME=PATH, got {item!r}")
        towers[name] = load(path)
    spec = VisionAuxSpec(batch_size=48)
    results = compare_towers(load(args.reference), towers, spec, args.batches)
    keys = ("loss", "cover_acc_on_objects", "centre_acc_on_centres", "count_acc_on_objects")
    keys += ("region_acc_on_objects",)
    print("| tower | " + " | ".join(keys) + " |")
    print("| --- " * (len(keys) + 1) + "|")
    for name, metrics in results.items():
        print(f"| {name} | " + " | ".join(f"{metrics[k]:.3f}" for k in keys) + " |")
    if args.json is not None:
        atomic_write_json(args.json, {"reference": args.reference, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
