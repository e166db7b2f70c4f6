"""Stage 0's dense loss kept on the tower during stage 1 (training.vision_aux): fixed read-out
heads fitted once per run, scenes seeded by the step, the loss moving the tower only, and the
trainer adding it to every step."""

from __future__ import annotations

import pytest
import torch
from training_fixtures import recipe_dict

from training.config import TrainConfig, VisionAuxSpec
from training.model_init import named_group_tensors
from training.run_log import LOG_NAME, read_log
from training.trainer import run_training
from training.vision_aux import HEADS_FILE, VisionAux, compare_towers
from visualchat.model.vision import VisionConfig, VisionTower

TOWER = {"image_size": 96, "patch_size": 24, "width": 32, "layers": 1, "head_width": 16}
SPEC = VisionAuxSpec(batch_size=4, probe_steps=30, probe_batch_size=8, probe_lr=3e-2)


def tower(seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    return VisionTower(VisionConfig(custom=dict(TOWER)))


def test_fitted_heads_read_the_tower_better_than_fresh_ones(tmp_path) -> None:
    vision = tower()
    aux = VisionAux.prepare(vision, SPEC, seed=0, precision="fp32", run_dir=tmp_path)
    fresh = VisionAux.prepare(
        vision, VisionAuxSpec(probe_steps=1, probe_batch_size=1), 0, "fp32", tmp_path / "other"
    )
    with torch.no_grad():
        fitted = sum(float(aux.loss(vision, step)[0]) for step in range(3))
        unfitted = sum(float(fresh.loss(vision, step)[0]) for step in range(3))
    assert fitted < 0.8 * unfitted
    assert all(not p.requires_grad for p in aux.heads.parameters())  # fixed after fitting


def test_a_resumed_run_reads_the_heads_its_first_start_fitted(tmp_path, monkeypatch) -> None:
    vision = tower()
    first = VisionAux.prepare(vision, SPEC, seed=0, precision="fp32", run_dir=tmp_path)
    assert (tmp_path / HEADS_FILE).exists()
    with torch.no_grad():  # the tower moves on, as stage 1 moves it
        for p in vision.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def refit(self, vision):
        raise AssertionError("a run folder with fitted heads must not refit them")

    monkeypatch.setattr(VisionAux, "fit_heads", refit)
    again = VisionAux.prepare(vision, SPEC, seed=0, precision="fp32", run_dir=tmp_path)
    fitted, read = first.heads.state_dict(), again.heads.state_dict()
    assert all(torch.equal(fitted[k], read[k]) for k in fitted)
    assert all(not p.requires_grad for p in again.heads.parameters())  # read heads stay fixed


def test_the_scenes_of_a_step_are_a_function_of_seed_and_step(tmp_path) -> None:
    vision = tower()
    aux = VisionAux.prepare(vision, SPEC, seed=0, precision="fp32", run_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(aux.loss(vision, 7)[0], aux.loss(vision, 7)[0])
        assert not torch.equal(aux.loss(vision, 7)[0], aux.loss(vision, 8)[0])


def test_preparing_leaves_the_runs_random_stream_alone(tmp_path) -> None:
    vision = tower()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    VisionAux.prepare(vision, SPEC, seed=0, precision="fp32", run_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_the_loss_moves_the_tower_and_not_the_heads(tmp_path) -> None:
    vision = tower()
    aux = VisionAux.prepare(vision, SPEC, seed=0, precision="bf16", run_dir=tmp_path)
    loss, accuracies = aux.loss(vision, 0)
    loss.backward()
    assert vision.visual.conv1.weight.grad is not None  # the patch embedding, first layer
    assert vision.visual.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in aux.heads.parameters())
    assert set(accuracies) >= {"count_acc_on_objects", "region_acc_on_objects"}


@pytest.mark.parametrize(
    "bad",
    [{"weight": 0}, {"batch_size": 0}, {"probe_steps": -1}, {"word_probability": 1.5}],
)
def test_bad_settings_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="vision_aux"):
        VisionAuxSpec(**bad)


def _stage(**extra) -> dict:
    return {"name": "chat", "trainable": ["vision", "projector"], "steps": 3, "lr": 1e-3, **extra}


def test_a_stage_that_does_not_train_the_tower_cannot_ask_for_it(
    tmp_path, backbone_dir, train_dir
) -> None:
    stage = _stage(vision_aux={"batch_size": 2})
    stage["trainable"] = ["projector"]
    with pytest.raises(ValueError, match="does not train vision"):
        TrainConfig.from_dict(recipe_dict(backbone_dir, train_dir, tmp_path, stages=[stage]))
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict(
            recipe_dict(
                backbone_dir, train_dir, tmp_path, stages=[_stage(vision_aux={"wieght": 1})]
            )
        )


def _run(tmp_path, backbone_dir, train_dir, name: str, **extra):
    recipe = recipe_dict(backbone_dir, train_dir, tmp_path / name, stages=[_stage(**extra)])
    recipe["model"]["vision"] = {"custom": dict(TOWER)}
    config = TrainConfig.from_dict(recipe)
    return config, run_training(config)


def test_the_trainer_adds_the_loss_to_every_step(tmp_path, backbone_dir, train_dir) -> None:
    aux = {"batch_size": 2, "probe_steps": 5, "probe_batch_size": 4, "weight": 5.0}
    config, with_aux = _run(tmp_path, backbone_dir, train_dir, "aux", vision_aux=aux)
    _, without = _run(tmp_path, backbone_dir, train_dir, "plain")
    assert (config.output_dir / HEADS_FILE).exists()
    records = [r for r in read_log(config.output_dir / LOG_NAME) if r["type"] == "train"]
    assert len(records) == 3
    assert all(r["vision_aux"]["aux_loss"] > 0 for r in records)
    assert "count_acc_on_objects" in records[0]["vision_aux"]
    # Same data, seed and schedule: only the auxiliary gradient tells the towers apart.
    a = named_group_tensors(with_aux.model, ["vision"])
    b = named_group_tensors(without.model, ["vision"])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    p = named_group_tensors(with_aux.model, ["projector"])
    q = named_group_tensors(without.model, ["projector"])
    assert all(torch.allclose(p[k], q[k], atol=1e-2) for k in p)


def test_a_tower_moved_away_reads_worse_through_the_reference_heads() -> None:
    reference = tower()
    moved = tower()
    moved.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.5 * torch.randn_like(p))
    results = compare_towers(reference, {"moved": moved, "same": tower()}, SPEC, batches=2)
    assert list(results) == ["reference", "moved", "same"]
    assert results["moved"]["loss"] > results["reference"]["loss"]
    assert results["same"]["loss"] == pytest.approx(results["reference"]["loss"])
