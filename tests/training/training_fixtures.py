"""Helpers for the training tests: tiny blended datasets in data_blend's on-disk layout, a tiny
backbone folder, and recipes around them."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from tests.factories import VISION_CONFIG, make_backbone, make_model, make_tokenizer
from visualchat.model import loading

datasets.disable_progress_bars()

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255)}
COLOR_NAMES = tuple(COLORS)

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "messages": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.List(
                    {"type": datasets.Value("string"), "text": datasets.Value("string")}
                ),
            }
        ),
        "images": datasets.Sequence(datasets.Image()),
        "families": datasets.List(datasets.Value("string")),
        "scenes": datasets.List(datasets.Value("string")),
    }
)


def solid(name: str, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), COLORS[name])


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


IMAGE_BLOCK = {"type": "image", "text": None}


def make_record(index: int, multi: bool = False) -> dict[str, Any]:
    """Record `index`: one image whose colour is the answer; with multi, two images and two
    turns (a cross-image question, then a colour question about Image 1)."""
    first = COLOR_NAMES[index % 3]
    if not multi:
        messages = [
            {"role": "user", "content": [IMAGE_BLOCK, text("What color is the image?")]},
            {"role": "assistant", "content": [text(first)]},
        ]
        images, families = [solid(first)], ["color"]
    else:
        second = COLOR_NAMES[(index + 1) % 3]
        messages = [
            {
                "role": "user",
                "content": [IMAGE_BLOCK, IMAGE_BLOCK, text(f"Which image is {second}?")],
            },
            {"role": "assistant", "content": [text("Image 2")]},
            {"role": "user", "content": [text("What color is Image 1?")]},
            {"role": "assistant", "content": [text(first)]},
        ]
        images, families = [solid(first), solid(second)], ["cross_which", "color"]
    return {
        "id": f"rec-{index}",
        "source": "test",
        "messages": messages,
        "images": images,
        "families": families,
        "scenes": [json.dumps({"color": c}) for c in (first, second)[: len(images)]]
        if multi
        else [json.dumps({"color": first})],
    }


def make_blended_dataset(tmp_path: Path, n: int, name: str = "blend", multi_every: int = 4) -> Path:
    """A data_blend-style folder (manifest.json + data/) of n records; every multi_every-th
    record has two images and two turns (0: never)."""
    folder = Path(tmp_path) / name
    records = [
        make_record(i, multi=bool(multi_every) and i % multi_every == multi_every - 1)
        for i in range(n)
    ]
    datasets.Dataset.from_list(records, features=FEATURES).save_to_disk(str(folder / "data"))
    (folder / "manifest.json").write_text(json.dumps({"num_records": n, "sources": ["test"]}))
    return folder


# What `recording_make_model` was told at each call, in order.
FACTORY_CALLS: list[frozenset[str]] = []


def recording_make_model(restoring: Collection[str] = (), **kwargs: Any):
    """tests.factories.make_model, recording the groups `init_model` says a checkpoint restores."""
    FACTORY_CALLS.append(frozenset(restoring))
    return make_model(**kwargs)


def save_tiny_backbone(folder: Path, seed: int = 0) -> Path:
    """A tiny llama backbone (tests.factories) saved as an HF folder: a path init for recipes
    and a loadable base for the exported delta."""
    tokenizer = make_tokenizer()
    loading.save_backbone(make_backbone(tokenizer, seed=seed), tokenizer, folder)
    return folder


def recipe_dict(
    backbone: Path,
    train: Path,
    output_dir: Path,
    eval_folder: Path | None = None,
    stages: list[dict[str, Any]] | None = None,
    **run: Any,
) -> dict[str, Any]:
    """A two-stage recipe (projector, then lora + projector) over the tiny backbone."""
    if stages is None:
        stages = [
            {"name": "projector", "trainable": ["projector"], "steps": 3, "lr": 3e-3},
            {
                "name": "lora",
                "trainable": ["lora", "projector"],
                "steps": 3,
                "lr": 3e-3,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"]},
            },
        ]
    for stage in stages:
        stage.setdefault("batch_size", 2)
    return {
        "model": {
            "init": str(backbone),
            "vision": {"custom": dict(VISION_CONFIG)},
            "projector": {"type": "mlp"},
            "attention": "mmca",
        },
        "data": {
            "train": str(train),
            "eval": None if eval_folder is None else str(eval_folder),
            "max_length": 256,
        },
        "stages": stages,
        "run": {"output_dir": str(output_dir), "progress": False, "log_every": 1, **run},
    }
