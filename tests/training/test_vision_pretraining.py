"""Stage 0 of the embedded recipe: dense per-patch targets and a few pretraining steps."""

from __future__ import annotations

import random

import pytest
import torch

from data_blend.sources.scenes import REGIONS, Group, Scene, generate_scene
from training.vision_pretraining import (
    NUM_COMBOS,
    VisionPretrainConfig,
    combo_class,
    patch_targets,
    pretrain_vision,
)
from visualchat.model.vision import VisionConfig, VisionTower


def test_patch_targets_mark_covered_patches_and_object_centres() -> None:
    # One large red circle centred in patch (row 1, col 2) of a 4x4 grid of 24 px patches.
    circle = Group("red", "circle", "large", "center", ((60, 36),))
    scene = Scene(96, (250, 250, 250), (circle,), "CAT", (2, 70, 40, 92))
    cover, centre, count, region = patch_targets(scene, grid=4)
    red_circle = combo_class("red", "circle")
    assert centre.tolist() == [0] * 6 + [red_circle] + [0] * 9
    # The circle (radius 12) covers the centre of its own patch only; the word box (x 2-40,
    # y 70-92) the centres of the first two patches of the bottom row.
    cat = 1 + NUM_COMBOS  # "CAT" is the first word
    assert cover.tolist() == [0] * 6 + [red_circle] + [0] * 5 + [cat, cat, 0, 0]
    # Group size and region only on the object's patch; the word has neither.
    assert count.tolist() == [0] * 6 + [1] + [0] * 9
    assert region.tolist() == [0] * 6 + [1 + REGIONS.index("center")] + [0] * 9


def test_group_size_and_region_mark_every_patch_of_the_group() -> None:
    # Two small blue stars in the left region, one per patch of a 4x4 grid of 24 px patches.
    stars = Group("blue", "star", "small", "left", ((12, 36), (12, 60)))
    _, _, count, region = patch_targets(Scene(96, (250, 250, 250), (stars,)), grid=4)
    left = 1 + REGIONS.index("left")
    assert count.tolist() == [0] * 4 + [2, 0, 0, 0] + [2, 0, 0, 0] + [0] * 4
    assert region.tolist() == [0] * 4 + [left, 0, 0, 0] + [left, 0, 0, 0] + [0] * 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_few_steps_lower_the_loss_and_touch_only_the_tower(precision: str) -> None:
    torch.manual_seed(0)
    tower = VisionTower(
        VisionConfig(
            custom={"image_size": 96, "patch_size": 24, "width": 32, "layers": 1, "head_width": 16}
        )
    )
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    cfg = VisionPretrainConfig(
        steps=12, batch_size=6, warmup_steps=2, log_every=4, lr=3e-3, precision=precision
    )
    history = pretrain_vision(tower, cfg)
    assert [h["step"] for h in history] == [4, 8, 12]
    assert history[-1]["loss"] < history[0]["loss"]
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert not tower.training
    assert all(p.dtype == torch.float32 for p in tower.parameters())  # autocast, fp32 weights


def test_the_tower_trains_with_the_math_attention_backend(monkeypatch) -> None:
    """Its forward (and so the backward autograd records) runs with flash attention off."""
    flash_enabled: list[bool] = []
    forward = VisionTower.forward

    def recording_forward(self, *args, **kwargs):
        flash_enabled.append(torch.backends.cuda.flash_sdp_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VisionTower, "forward", recording_forward)
    tower = VisionTower(
        VisionConfig(
            custom={"image_size": 96, "patch_size": 24, "width": 32, "layers": 1, "head_width": 16}
        )
    )
    pretrain_vision(tower, VisionPretrainConfig(steps=2, batch_size=2, warmup_steps=1))
    assert flash_enabled and not any(flash_enabled)
    assert torch.backends.cuda.flash_sdp_enabled()  # switched back afterwards


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        VisionPretrainConfig(precision="fp16")


def test_scenes_come_from_the_training_split() -> None:
    scene = generate_scene(random.Random(3), 96, "train")
    assert scene.split == "train"
