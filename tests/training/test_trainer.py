"""A two-stage run (projector, then LoRA + projector) on a trivially learnable set: the loss
falls, only the trained groups change, checkpoints hold only them, exports reload exactly."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_fixtures import FACTORY_CALLS, make_record, recipe_dict

from training.checkpoint import TrainState, find_latest, list_checkpoints
from training.config import ModelSpec, TrainConfig
from training.data import DataOrder, approximate_lengths, open_blended, plan_micro_batches
from training.fast_step import decoder_layers
from training.model_init import has_lora, init_model, named_group_tensors
from training.run_log import read_log
from training.trainer import run_training
from visualchat.api import VisualChat
from visualchat.model import delta, loading
from visualchat.model.modeling import VisualChatModel

STAGES = [
    {"name": "projector", "trainable": ["projector"], "steps": 10, "lr": 1e-2, "batch_size": 4},
    {
        "name": "lora",
        "trainable": ["lora", "projector"],
        "steps": 10,
        "lr": 1e-2,
        "batch_size": 4,
        "warmup_steps": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    },
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone_dir, train_dir, eval_dir):
    out = tmp_path_factory.mktemp("run") / "out"
    config = TrainConfig.from_dict(
        recipe_dict(
            backbone_dir,
            train_dir,
            out,
            eval_dir,
            stages=[dict(s) for s in STAGES],
            save_every=4,
            eval_every=10,
            eval_max_tokens=2,
            merge=True,
        )
    )
    return config, run_training(config)


def test_loss_goes_down(trained) -> None:
    config, result = trained
    train = [r for r in read_log(config.output_dir / "log.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["stage"] for r in train] == ["projector"] * 10 + ["lora"] * 10
    first, last = [r["loss"] for r in train[:3]], [r["loss"] for r in train[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, (first, last)
    assert result.global_step == 20 and result.train_loss == train[-1]["loss"]
    for record in train:
        assert record["samples_per_s"] > 0 and record["tokens_per_s"] > 0
        assert record["elapsed"] > 0 and record["dropped"] == 0
    # Warm-up of the second stage: step 1 of 2 runs at lr / 3, step 2 at 2 lr / 3.
    assert train[10]["lr"] == pytest.approx(1e-2 / 3) and train[11]["lr"] == pytest.approx(2e-2 / 3)
    assert train[0]["lr"] == pytest.approx(1e-2)  # no warm-up: cosine from the full rate


def test_gradient_norm_logged_before_clipping(trained) -> None:
    config, _ = trained
    train = [r for r in read_log(config.output_dir / "log.jsonl") if r["type"] == "train"]
    limit = config.stages[0].max_grad_norm
    assert limit == 1.0
    for record in train:  # one step per log line here, so the window's mean is that step's norm
        assert record["grad_norm"] > 0 and record["grad_norm_max"] == record["grad_norm"]
        assert record["clipped_fraction"] == float(record["grad_norm"] > limit)
    # The fresh projector's first steps are clipped: the norm is the one before clipping.
    assert train[0]["grad_norm"] > limit and train[0]["clipped_fraction"] == 1.0


def test_gradient_norm_window_aggregates_its_steps(tmp_path, backbone_dir, train_dir) -> None:
    """A window of five steps logs the mean and max of the per-step norms and the share of them
    over the limit; the limit here lies inside the run's range of norms, so both kinds occur."""
    stage = {"name": "projector", "trainable": ["projector"], "steps": 10, "lr": 1e-2}
    stage.update(batch_size=4, max_grad_norm=2.0)
    logs = {}
    for every in (1, 5):
        out = tmp_path / f"every{every}"
        recipe = recipe_dict(backbone_dir, train_dir, out, stages=[dict(stage)], log_every=every)
        run_training(TrainConfig.from_dict(recipe))
        logs[every] = [r for r in read_log(out / "log.jsonl") if r["type"] == "train"]
    steps = [r["grad_norm"] for r in logs[1]]  # the same seed: the same steps
    assert min(steps) < 2.0 < max(steps), steps
    for window, record in zip((steps[:5], steps[5:]), logs[5], strict=True):
        assert record["grad_norm"] == pytest.approx(sum(window) / 5, rel=1e-4)
        assert record["grad_norm_max"] == pytest.approx(max(window), rel=1e-4)
        assert record["clipped_fraction"] == sum(n > 2.0 for n in window) / 5


def test_eval_records(trained) -> None:
    config, result = trained
    evals = [r for r in read_log(config.output_dir / "log.jsonl") if r["type"] == "eval"]
    assert [(r["step"], r["stage"]) for r in evals] == [(10, "projector"), (20, "lora")]
    for record in evals:
        assert record["eval_loss"] > 0 and record["eval_samples"] == 4
        assert 0.0 <= record["accuracy"] <= 1.0
        assert set(record["groups"]) == {"attribute", "cross_image"}
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] + 1.0
    assert result.eval == evals[-1]


def test_only_trained_groups_changed(trained) -> None:
    config, result = trained
    initial = init_model(config.model, config.run.seed).model
    before = dict(initial.named_parameters())
    base = result.model.language_model.get_base_model()  # peft keeps the frozen layers inside
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        original = before["language_model." + name.replace(".base_layer", "")]
        assert torch.equal(param.detach(), original), f"frozen {name} changed"
    for name, param in result.model.vision.named_parameters():
        assert torch.equal(param.detach(), before["vision." + name]), f"frozen vision.{name}"
    for name, param in result.model.projector.named_parameters():
        assert not torch.equal(param.detach(), before["projector." + name]), name
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero


def test_checkpoints_hold_only_trained_tensors(trained) -> None:
    config, result = trained
    root = config.output_dir / "checkpoints"
    kept = list_checkpoints(root)
    assert [p.name for p in kept] == ["step-000016", "step-000020"]  # keep_checkpoints: 2
    assert find_latest(root) == kept[-1] and (root / "latest").read_text() == "step-000020\n"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    last = kept[-1]
    assert sorted(p.name for p in last.iterdir()) == [
        "config.yaml",
        "optimizer.pt",
        "rng.pt",
        "state.json",
        "trainable.safetensors",
    ]
    tensors = load_file(str(last / "trainable.safetensors"))
    expected = named_group_tensors(result.model, ["projector", "lora"])
    assert set(tensors) == set(expected)
    assert {n.split(".")[0] for n in tensors} == {"projector", "language_model"}
    assert all(".lora_" in n for n in tensors if n.startswith("language_model."))
    for name, value in tensors.items():
        assert torch.equal(value, expected[name].detach().cpu()), name
    state = TrainState(**json.loads((last / "state.json").read_text()))
    assert state == TrainState(
        global_step=20, stage_index=1, data_position=80, num_processes=1, num_dropped=0
    )
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)
    assert set(optimizer) == {"optimizer", "scheduler"}
    assert optimizer["scheduler"]["last_epoch"] == 10
    assert len(torch.load(last / "rng.pt", weights_only=True)) == 1
    assert TrainConfig.from_dict(__import__("yaml").safe_load((last / "config.yaml").read_text()))


@pytest.mark.parametrize("which", ["final", "merged"])
def test_exports_reload_with_the_same_logits(trained, which: str) -> None:
    config, result = trained
    folder = result.final_dir if which == "final" else result.merged_dir
    assert delta.is_delta(folder) == (which == "final")
    loaded, _ = loading.load_pretrained(folder)
    assert not hasattr(loaded.language_model, "peft_config")  # LoRA merged for inference
    batch = _batch(result)
    model = result.model.eval()
    with torch.no_grad():
        expected = model(batch.input_ids, batch.token_modality, pixel_values=batch.pixel_values)
        actual = loaded(batch.input_ids, batch.token_modality, pixel_values=batch.pixel_values)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)
    if which == "final":
        payload = json.loads((folder / "visualchat_config.json").read_text())
        assert payload["base_backbone"] == str(Path(config.model.init).resolve())


def _batch(result):
    from training.collator import Collator
    from visualchat.processor import VisualChatProcessor

    model = result.model
    processor = VisualChatProcessor(
        result.tokenizer, model.vision.image_transform(), model.num_image_tokens
    )
    return Collator(processor, 1000)([make_record(1, multi=True)])


def test_a_finished_run_refuses_a_fresh_start_and_resumes_to_the_same_end(trained) -> None:
    config, result = trained
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run_training(config, resume=False)
    log_before = (config.output_dir / "log.jsonl").read_text()
    again = run_training(config, resume=True)
    assert again.global_step == 20
    # The end-of-run eval (after the last checkpoint) is redone, replacing the old record.
    assert (config.output_dir / "log.jsonl").read_text().count('"step": 20') == 2
    assert len(log_before.splitlines()) == len(read_log(config.output_dir / "log.jsonl"))
    for name, value in named_group_tensors(again.model, ["projector", "lora"]).items():
        assert torch.equal(value, dict(result.model.named_parameters())[name]), name


def test_data_order_is_a_function_of_seed_and_epoch() -> None:
    order = DataOrder(5, seed=7)
    first = order.indices(0, 15)
    assert sorted(first[:5]) == sorted(first[5:10]) == list(range(5))  # each epoch a permutation
    assert first[:5] != first[5:10]  # and a different one per epoch
    assert DataOrder(5, seed=7).indices(6, 4) == first[6:10]  # any position, fresh object
    assert DataOrder(5, seed=8).indices(0, 5) != first[:5]
    # Two ranks read contiguous slices of each global micro-batch, in order.
    rank0 = plan_micro_batches(order, 3, 2, batch_size=2, num_processes=2, process_index=0)
    rank1 = plan_micro_batches(order, 3, 2, batch_size=2, num_processes=2, process_index=1)
    assert rank0 == [first[3:5], first[7:9]] and rank1 == [first[5:7], first[9:11]]


def test_group_by_length_reorders_within_a_step_only() -> None:
    order = DataOrder(40, seed=3)
    lengths = np.random.default_rng(0).integers(10, 300, size=40)
    plain = plan_micro_batches(order, 8, 6, batch_size=4, num_processes=1, process_index=0)
    grouped = plan_micro_batches(
        order, 8, 6, batch_size=4, num_processes=1, process_index=0, lengths=lengths, grad_accum=3
    )
    assert [len(m) for m in grouped] == [4] * 6
    for step in (0, 3):  # each optimiser step reads the same records, sorted by length
        same = sorted(i for m in plain[step : step + 3] for i in m)
        assert sorted(i for m in grouped[step : step + 3] for i in m) == same
        flat = [lengths[i] for m in grouped[step : step + 3] for i in m]
        assert flat == sorted(flat)


def test_approximate_lengths_order_like_token_counts(train_dir) -> None:
    dataset = open_blended(train_dir)
    lengths = approximate_lengths(dataset, image_tokens=16)
    images = [
        sum(b["type"] == "image" for m in r for b in m["content"]) for r in dataset["messages"]
    ]
    assert lengths.shape == (len(dataset),) and (lengths > 0).all()
    assert all(length >= 16 * n for length, n in zip(lengths, images, strict=True))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes mixed precision once per process; its own tests reset it like this."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_run_keeps_fp32_weights(
    tmp_path, backbone_dir, train_dir, fresh_accelerate_state
) -> None:
    stages = [{"name": "projector", "trainable": ["projector"], "steps": 2, "lr": 1e-3}]
    config = TrainConfig.from_dict(
        recipe_dict(backbone_dir, train_dir, tmp_path / "bf16", stages=stages, precision="bf16")
    )
    result = run_training(config)
    losses = [r["loss"] for r in read_log(config.output_dir / "log.jsonl")]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    batch = _batch(result)
    inputs = (batch.input_ids, batch.token_modality)
    with torch.no_grad():
        autocast = result.model(*inputs, pixel_values=batch.pixel_values).logits
        plain = VisualChatModel.forward(result.model, *inputs, pixel_values=batch.pixel_values)
    # accelerate wrapped the instance's forward in a bf16 autocast, outputs back in fp32.
    assert autocast.dtype == plain.logits.dtype == torch.float32
    assert not torch.equal(autocast, plain.logits)
    torch.testing.assert_close(autocast, plain.logits, atol=0.1, rtol=0.05)


def test_fast_steps_train_like_plain_ones(
    tmp_path, backbone_dir, train_dir, eval_dir, fresh_accelerate_state, caplog
) -> None:
    """run.frozen_weights_bf16 + run.compile (training.fast_step): the same losses as a plain
    bf16 run up to the compiled kernels' rounding, evaluation on the float32 weights, and a
    model handed back uncompiled and in float32."""
    stages = [
        {
            "name": "lora",
            "trainable": ["lora", "projector"],
            "steps": 3,
            "lr": 1e-3,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        }
    ]
    logs, messages = {}, {}
    for name, fast in (("plain", False), ("fast", True)):
        caplog.clear()
        caplog.set_level(logging.INFO, logger="training")
        config = TrainConfig.from_dict(
            recipe_dict(
                backbone_dir,
                train_dir,
                tmp_path / name,
                eval_dir,
                stages=[dict(s) for s in stages],
                precision="bf16",
                eval_max_tokens=2,
                frozen_weights_bf16=fast,
                compile=fast,
            )
        )
        result = run_training(config)
        logs[name] = read_log(config.output_dir / "log.jsonl")
        messages[name] = caplog.text
    # The switches acted in the fast run only (the equalities below would hold without them).
    for sign in ("frozen linear weights held in bf16", "decoder layers compiled"):
        assert sign in messages["fast"] and sign not in messages["plain"], sign
    losses = {name: [r["loss"] for r in log if r["type"] == "train"] for name, log in logs.items()}
    assert len(losses["fast"]) == 3
    assert losses["fast"] == pytest.approx(losses["plain"], rel=2e-2)
    evals = {name: [r for r in log if r["type"] == "eval"] for name, log in logs.items()}
    assert len(evals["fast"]) == 1
    assert evals["fast"][0]["eval_loss"] == pytest.approx(evals["plain"][0]["eval_loss"], rel=2e-2)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    layers = decoder_layers(result.model.language_model)
    assert all(layer._compiled_call_impl is None for layer in layers)


@pytest.mark.parametrize("which", ["final", "merged"])
def test_a_checkpoint_init_starts_from_the_trained_model(trained, which: str) -> None:
    """init: a delta continues its adapter (unmerged, trainable); a full checkpoint loads."""
    config, result = trained
    folder = result.final_dir if which == "final" else result.merged_dir
    spec = dataclasses.replace(config.model, init=str(folder), vision=None, projector=None)
    init = init_model(spec, seed=123)
    assert has_lora(init.model) == (which == "final")
    if which == "final":
        assert init.base_backbone == str(Path(config.model.init).resolve())
        lora = named_group_tensors(init.model, ["lora"])
        assert lora and all(p.requires_grad for p in lora.values())
    else:
        assert init.base_backbone == str(folder.resolve())
    batch = _batch(result)
    with torch.no_grad():
        expected = result.model.eval()(
            batch.input_ids, batch.token_modality, pixel_values=batch.pixel_values
        )
        actual = init.model.eval()(
            batch.input_ids, batch.token_modality, pixel_values=batch.pixel_values
        )
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="brings its own vision tower"):
        init_model(dataclasses.replace(spec, projector={"type": "linear"}), seed=0)


def test_a_factory_init_trains_and_exports(tmp_path, backbone_dir, train_dir) -> None:
    """model.init "module:function": tests.factories.make_model(seed=0) wraps the same random
    backbone that backbone_dir holds, so the exported delta names it as its base."""
    data = recipe_dict(
        backbone_dir,
        train_dir,
        tmp_path / "factory",
        stages=[{"name": "lora", "trainable": ["lora"], "steps": 2, "lr": 1e-2}],
    )
    data["model"] = {
        "init": "tests.factories:make_model",
        "factory_kwargs": {"seed": 0},
        "base_backbone": str(backbone_dir),
    }
    result = run_training(TrainConfig.from_dict(data))
    loaded, _ = loading.load_pretrained(result.final_dir)
    batch = _batch(result)
    with torch.no_grad():
        expected = result.model.eval()(
            batch.input_ids, batch.token_modality, pixel_values=batch.pixel_values
        )
        actual = loaded(batch.input_ids, batch.token_modality, pixel_values=batch.pixel_values)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_a_factory_is_told_which_groups_a_checkpoint_restores(
    tmp_path, backbone_dir, train_dir
) -> None:
    """Resume and export rebuild the model, then overwrite the trained groups from the
    checkpoint; a factory with a `restoring` keyword hears which (so the embedded one skips its
    75-s projector alignment), a fresh start says none, a factory without it is called as
    before (test_a_factory_init_trains_and_exports)."""
    from training.export import main as export_main

    stages = [
        {
            "name": "lora",
            "trainable": ["lora", "projector"],
            "steps": 2,
            "lr": 1e-2,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]},
        }
    ]
    data = recipe_dict(backbone_dir, train_dir, tmp_path / "run", stages=stages, save_every=1)
    data["model"] = {
        "init": "training_fixtures:recording_make_model",
        "factory_kwargs": {"seed": 0},
        "base_backbone": str(backbone_dir),
    }
    FACTORY_CALLS.clear()
    config = TrainConfig.from_dict(data)
    run_training(config)
    assert list(FACTORY_CALLS) == [frozenset()]
    checkpoints = list_checkpoints(config.output_dir / "checkpoints")
    assert export_main([str(checkpoints[0]), str(tmp_path / "delta")]) == 0
    assert FACTORY_CALLS[-1] == {"lora", "projector"}
    # A resumed run (here: one whose last checkpoint is gone) is told the same.
    shutil.rmtree(checkpoints[-1])
    run_training(config)
    assert FACTORY_CALLS[-1] == {"lora", "projector"}


def test_init_errors_are_actionable(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        init_model(ModelSpec(init=str(tmp_path / "nope")), seed=0)
    with pytest.raises(ValueError, match="cannot import the factory"):
        init_model(ModelSpec(init="tests.factories:no_such_function"), seed=0)


def test_a_step_checkpoint_exports_as_the_delta_the_run_wrote(trained, tmp_path) -> None:
    # The last checkpoint holds the finished run's tensors, so its export equals final/.
    from training.export import main as export_main

    config, result = trained
    last = config.output_dir / "checkpoints" / "step-000020"
    assert export_main([str(last), str(tmp_path / "delta")]) == 0
    exported = load_file(str(tmp_path / "delta" / "model.safetensors"))
    final = load_file(str(result.final_dir / "model.safetensors"))
    assert set(exported) == set(final)
    assert all(torch.equal(exported[name], final[name]) for name in final)
    ours = VisualChat.from_pretrained(tmp_path / "delta")
    theirs = VisualChat.from_pretrained(result.final_dir)
    batch = _batch(result)
    with torch.no_grad():
        a = ours.model(batch.input_ids, batch.token_modality, pixel_values=batch.pixel_values)
        b = theirs.model(batch.input_ids, batch.token_modality, pixel_values=batch.pixel_values)
    torch.testing.assert_close(a.logits, b.logits)
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
