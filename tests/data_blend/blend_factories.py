"""Factory helpers for the data_blend tests: tiny images, fixture files and in-memory sources."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data_blend.sample import Round, Sample, SkipLog
from visualchat.messages import ImagePart, TextPart

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def make_image(colour: tuple[int, int, int] = RED, size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def save_image(path: Path, colour: tuple[int, int, int] = RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(colour).save(path)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def make_sample(
    sample_id: str,
    source: str = "src",
    questions: Sequence[str] = ("What is in the image?",),
    answers: Sequence[str] | None = None,
    num_images: int = 1,
    colours: Sequence[tuple[int, int, int]] | None = None,
    families: Sequence[str] | None = None,
) -> Sample:
    """A sample with ``num_images`` images in its first user turn, before the question."""
    answers = answers if answers is not None else [f"answer {i}" for i in range(len(questions))]
    families = families if families is not None else [""] * len(questions)
    colours = colours if colours is not None else [RED] * num_images
    rounds = [
        Round([TextPart(q)], a, f) for q, a, f in zip(questions, answers, families, strict=True)
    ]
    rounds[0].user[:0] = [ImagePart(make_image(c)) for c in colours]
    scenes = [f"scene-{sample_id}-{i}" for i in range(num_images)]
    return Sample(f"{source}/{sample_id}", source, rounds, scenes)


class ListSource(Sequence[Sample]):
    """An in-memory source over given samples."""

    def __init__(self, name: str, samples: Sequence[Sample]) -> None:
        self.name = name
        self.skips = SkipLog(name)
        self._samples = list(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        return self._samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)


def texts(sample: Sample) -> list[tuple[str, str]]:
    """(user text, answer) of every round; the user text joins the text parts."""
    return [
        (" | ".join(p.text for p in r.user if isinstance(p, TextPart)), r.answer)
        for r in sample.rounds
    ]


def words_length(conversation: Any, image_tokens: int = 10) -> int:
    """A deterministic length_fn: whitespace words plus ``image_tokens`` per image."""
    return sum(len(m.text.split()) for m in conversation.messages) + image_tokens * (
        conversation.num_images
    )
