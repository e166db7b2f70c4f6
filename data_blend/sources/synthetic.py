"""The synthetic multi-image world: scenes drawn with PIL and questions about them, fully
deterministic from (seed, split, index).

One sample is 1-4 images (all in the first user turn, "Image 1..k") and 1-4 question/answer
rounds about them. Question families and their exact answer format (answers are short canonical
strings, compared by exact match):

- ``color``: "What colour is the star?" -> a colour name from ``COLOURS``, lower case ("red");
  asked only about a shape that only one group of the image has.
- ``shape``: "What shape is the blue object?" -> a singular shape name from ``SHAPES``
  ("circle"); asked only about a colour that only one group of the image has.
- ``count``: "How many triangles are there?" (a shape, a colour + shape, or all objects) ->
  decimal digits ("3").
- ``position``: "Where is the green square?" -> a region from ``REGIONS`` ("left", "right",
  "top", "bottom", "center"); every group lies in a single region.
- ``word``: "What word is written in the image?" -> the word, upper case ("CAT"); asked only
  about an image that has a word.
- ``cross_which``: "Which image has a blue star?" -> "Image k" (capital I, the 1-based number);
  exactly one image qualifies.
- ``cross_count``: "How many of these images contain a circle?" -> decimal digits ("2").
- ``cross_common``: "What do image 1 and image 3 have in common?" -> "a {colour} {shape}" ("a
  green circle", "an orange star"); the two images share exactly that (colour, shape) and no
  other colour or shape.

In a sample of several images, single-image questions name their image ("In image 2, what
colour is the star?", "What word is written in image 3?").

The first round's family is drawn from the configured weights (or cycled through them, with
``balanced``), the number of images fits the family, and the scenes are generated so that the
family has a question; later rounds pick among the questions the scenes support. Scenes belong to
the requested split (see :mod:`data_blend.sources.scenes`): ``train`` and ``heldout`` never share
a scene.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from data_blend.renumber import refer_to_image
from data_blend.sample import Round, Sample, SkipLog
from data_blend.sources.scenes import (
    COLOURS,
    REGIONS,
    SHAPES,
    SPLITS,
    WORDS,
    Scene,
    Split,
    generate_scene,
    render,
    scene_labels,
)
from visualchat.messages import ImagePart, Part, TextPart

__all__ = [
    "COLOURS",
    "CROSS_FAMILIES",
    "FAMILIES",
    "REGIONS",
    "SHAPES",
    "SINGLE_FAMILIES",
    "WORDS",
    "Scene",
    "SyntheticConfig",
    "SyntheticSource",
    "SyntheticWorld",
    "scene_labels",
]

SINGLE_FAMILIES: tuple[str, ...] = ("color", "shape", "count", "position", "word")
CROSS_FAMILIES: tuple[str, ...] = ("cross_which", "cross_count", "cross_common")
FAMILIES: tuple[str, ...] = SINGLE_FAMILIES + CROSS_FAMILIES


@dataclass(frozen=True)
class SyntheticConfig:
    image_size: int = 96  # pixels, square
    min_images: int = 1  # images per sample
    max_images: int = 4
    min_rounds: int = 1  # question/answer rounds per sample
    max_rounds: int = 4
    families: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 1.0))
    balanced: bool = False  # first family cycles through the weighted families (index order)
    word_probability: float = 0.4  # chance that a scene has a word (when no family needs one)
    max_groups: int = 3  # object groups per scene

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 32..1024, got {self.image_size}")
        if not 1 <= self.min_images <= self.max_images <= 8:
            raise ValueError(
                f"need 1 <= min_images <= max_images <= 8, got {self.min_images}, {self.max_images}"
            )
        if not 1 <= self.min_rounds <= self.max_rounds <= 8:
            raise ValueError(
                f"need 1 <= min_rounds <= max_rounds <= 8, got {self.min_rounds}, {self.max_rounds}"
            )
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown question families {unknown}; known: {', '.join(FAMILIES)}")
        if any(weight < 0 for weight in self.families.values()) or not self.active_families:
            raise ValueError(f"family weights must be >= 0 with one > 0, got {self.families}")
        cross = [f for f in self.active_families if f in CROSS_FAMILIES]
        if cross and self.max_images < 2:
            raise ValueError(
                f"cross-image families {cross} need max_images >= 2 (got {self.max_images}); "
                "raise max_images or give them weight 0"
            )
        if not 0 <= self.word_probability <= 1:
            raise ValueError(f"word_probability must be in [0, 1], got {self.word_probability}")
        if not 1 <= self.max_groups <= 3:
            raise ValueError(f"max_groups must be 1, 2 or 3, got {self.max_groups}")

    @property
    def active_families(self) -> list[str]:
        """Families with a positive weight, in FAMILIES order."""
        return [f for f in FAMILIES if self.families.get(f, 0) > 0]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SyntheticConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown synthetic config key(s) {unknown}; known: {', '.join(sorted(names))}"
            )
        data = dict(data)
        if "families" in data:  # weights of the families not named are 0
            data["families"] = {name: float(w) for name, w in dict(data["families"]).items()}
        return cls(**data)


@dataclass(frozen=True)
class Question:
    family: str
    image: int | None  # 0-based image a single-image question is about; None for cross
    key: tuple[Any, ...]  # what is asked, to never ask it twice in a sample
    answer: str
    forms: tuple[str, ...]  # phrasings, one picked at random


class SyntheticWorld:
    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config or SyntheticConfig()

    def samples(
        self, num_samples: int, split: Split = "train", seed: int = 0, source: str = "synthetic"
    ) -> Iterator[Sample]:
        """Samples ``0 .. num_samples - 1`` of the split."""
        return (self.sample(i, split, seed, source) for i in range(num_samples))

    def sample(
        self, index: int, split: Split = "train", seed: int = 0, source: str = "synthetic"
    ) -> Sample:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        config = self.config
        rng = random.Random(_derive_seed(seed, split, index))
        active = config.active_families
        if config.balanced:
            family = active[index % len(active)]
        else:
            family = rng.choices(active, [config.families[f] for f in active])[0]
        low = max(config.min_images, 2) if family in CROSS_FAMILIES else config.min_images
        scenes = self._scenes_for(rng, family, rng.randint(low, config.max_images), split)
        questions = [rng.choice(_questions(scenes, family))]
        for _ in range(rng.randint(config.min_rounds, config.max_rounds) - 1):
            question = self._next_question(rng, scenes, {q.key for q in questions})
            if question is None:
                break
            questions.append(question)
        images: list[Part] = [ImagePart(render(scene)) for scene in scenes]
        rounds = [
            Round([TextPart(self._phrase(rng, q, len(scenes)))], q.answer, q.family)
            for q in questions
        ]
        rounds[0].user[:0] = images
        sample_id = f"{source}/{split}-{seed}-{index}"
        return Sample(sample_id, source, rounds, [scene.to_json() for scene in scenes])

    def _scenes_for(
        self, rng: random.Random, family: str, num_images: int, split: Split
    ) -> list[Scene]:
        """Scenes in which ``family`` has at least one question."""

        def scene(**constraints: Any) -> Scene:
            return generate_scene(
                rng,
                self.config.image_size,
                split,
                word_probability=self.config.word_probability,
                max_groups=self.config.max_groups,
                **constraints,
            )

        target = rng.randrange(num_images)
        if family in SINGLE_FAMILIES:
            constraints: dict[str, Any] = {
                "color": {"accept": lambda s: bool(_color_questions(s, 0))},
                "shape": {"accept": lambda s: bool(_shape_questions(s, 0))},
                "word": {"with_word": True},
            }.get(family, {})
            return [scene(**constraints) if i == target else scene() for i in range(num_images)]
        combo = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if family == "cross_which":
            return [
                scene(required=combo) if i == target else scene(forbidden={combo})
                for i in range(num_images)
            ]
        scenes = [scene() for _ in range(num_images)]
        if family == "cross_common":
            first, second = sorted(rng.sample(range(num_images), 2))
            scenes[first] = scene(required=combo)
            scenes[second] = scene(
                required=combo, accept=lambda s: _shared(scenes[first], s) == combo
            )
        return scenes

    def _next_question(
        self, rng: random.Random, scenes: list[Scene], asked: set[tuple[Any, ...]]
    ) -> Question | None:
        by_family = {}
        for family in self.config.active_families:
            if family in CROSS_FAMILIES and len(scenes) < 2:
                continue
            fresh = [q for q in _questions(scenes, family) if q.key not in asked]
            if fresh:
                by_family[family] = fresh
        if not by_family:
            return None
        families = list(by_family)
        family = rng.choices(families, [self.config.families[f] for f in families])[0]
        return rng.choice(by_family[family])

    @staticmethod
    def _phrase(rng: random.Random, question: Question, num_images: int) -> str:
        text = rng.choice(question.forms)
        if question.image is not None and num_images > 1:
            text = refer_to_image(text, question.image + 1)
        return text


class SyntheticSource(Sequence[Sample]):
    """A synthetic split as a blend source: sample ``i`` is made when it is drawn."""

    def __init__(
        self,
        world: SyntheticWorld,
        split: Split = "train",
        num_samples: int = 100_000,  # the pool the blender draws from
        seed: int = 0,
        name: str = "synthetic",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"{name}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if num_samples < 1:
            raise ValueError(f"{name}: num_samples must be positive, got {num_samples}")
        self.world, self.split, self.seed, self.name = world, split, seed, name
        self.num_samples = num_samples
        self.skips = SkipLog(name)  # never used: generated samples are always valid

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.name}: sample {index} of {self.num_samples}")
        return self.world.sample(index, self.split, self.seed, self.name)

    def __iter__(self) -> Iterator[Sample]:
        return self.world.samples(self.num_samples, self.split, self.seed, self.name)


def _derive_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.sha256(f"visualchat-synthetic:{seed}:{split}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


# --- question families ----------------------------------------------------------------------


def _questions(scenes: list[Scene], family: str) -> list[Question]:
    if family in SINGLE_FAMILIES:
        single = _SINGLE_IMAGE[family]
        return [q for i, scene in enumerate(scenes) for q in single(scene, i)]
    return _CROSS_IMAGE[family](scenes)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _color_questions(scene: Scene, image: int) -> list[Question]:
    questions = []
    for shape in SHAPES:
        groups = scene.groups_with(shape=shape)
        if len(groups) != 1:
            continue
        if groups[0].count == 1:
            forms = (
                f"What colour is the {shape}?",
                f"What color is the {shape}?",
                f"Which colour is the {shape} in the image?",
                f"What is the colour of the {shape}?",
            )
        else:
            forms = (
                f"What colour are the {shape}s?",
                f"What color are the {shape}s?",
                f"Which colour are the {shape}s in the image?",
                f"What is the colour of the {shape}s?",
            )
        questions.append(Question("color", image, ("color", image, shape), groups[0].colour, forms))
    return questions


def _shape_questions(scene: Scene, image: int) -> list[Question]:
    questions = []
    for colour in COLOURS:
        groups = scene.groups_with(colour=colour)
        if len(groups) != 1:
            continue
        noun = "object" if groups[0].count == 1 else "objects"
        verb = "is" if groups[0].count == 1 else "are"
        forms = (
            f"What shape {verb} the {colour} {noun}?",
            f"What is the shape of the {colour} {noun}?",
            f"Name the shape of the {colour} {noun}.",
            f"Which shape {verb} the {colour} {noun} in the image?",
        )
        questions.append(Question("shape", image, ("shape", image, colour), groups[0].shape, forms))
    return questions


def _count_questions(scene: Scene, image: int) -> list[Question]:
    questions = []
    for shape in sorted({g.shape for g in scene.groups}, key=SHAPES.index):
        forms = (
            f"How many {shape}s are there?",
            f"How many {shape}s can you see?",
            f"Count the {shape}s in the image.",
            f"What is the number of {shape}s?",
        )
        answer = str(scene.count(shape=shape))
        questions.append(Question("count", image, ("count", image, shape), answer, forms))
    for group in scene.groups:
        what = f"{group.colour} {group.shape}s"
        forms = (
            f"How many {what} are there?",
            f"How many {what} can you see?",
            f"Count the {what} in the image.",
        )
        key = ("count", image, group.colour, group.shape)
        questions.append(Question("count", image, key, str(group.count), forms))
    forms = (
        "How many objects are there?",
        "How many shapes are in the image?",
        "Count the objects in the image.",
    )
    questions.append(Question("count", image, ("count", image), str(scene.count()), forms))
    return questions


def _position_questions(scene: Scene, image: int) -> list[Question]:
    questions = []
    for group in scene.groups:
        if group.count == 1:
            what, verb = f"{group.colour} {group.shape}", "is"
        else:
            what, verb = f"{group.colour} {group.shape}s", "are"
        forms = (
            f"Where {verb} the {what}?",
            f"In which part of the image {verb} the {what}?",
            f"Where {verb} the {what} located?",
        )
        key = ("position", image, group.colour, group.shape)
        questions.append(Question("position", image, key, group.region, forms))
    return questions


def _word_questions(scene: Scene, image: int) -> list[Question]:
    if scene.word is None:
        return []
    forms = (
        "What word is written in the image?",
        "What does the text in the image say?",
        "Read the word in the image.",
        "Which word appears in the image?",
    )
    return [Question("word", image, ("word", image), scene.word, forms)]


def _cross_which_questions(scenes: list[Scene]) -> list[Question]:
    questions = []
    for colour, shape in sorted({c for s in scenes for c in s.combos()}):
        holders = [i for i, scene in enumerate(scenes) if (colour, shape) in scene.combos()]
        if len(holders) != 1:
            continue
        what = f"{_a(colour)} {colour} {shape}"
        forms = (
            f"Which image has {what}?",
            f"Which image contains {what}?",
            f"In which image is there {what}?",
            f"Which of the images shows {what}?",
        )
        key = ("cross_which", colour, shape)
        questions.append(Question("cross_which", None, key, f"Image {holders[0] + 1}", forms))
    return questions


def _cross_count_questions(scenes: list[Scene]) -> list[Question]:
    questions = []
    targets: list[tuple[str | None, str]] = [
        (None, shape) for shape in SHAPES if any(s.count(shape=shape) for s in scenes)
    ]
    targets += sorted({c for s in scenes for c in s.combos()})
    for colour, shape in targets:
        what = f"{_a(shape)} {shape}" if colour is None else f"{_a(colour)} {colour} {shape}"
        forms = (
            f"How many of these images contain {what}?",
            f"In how many images is there {what}?",
            f"How many images show {what}?",
        )
        answer = str(sum(s.count(colour, shape) > 0 for s in scenes))
        key = ("cross_count", colour, shape)
        questions.append(Question("cross_count", None, key, answer, forms))
    return questions


def _cross_common_questions(scenes: list[Scene]) -> list[Question]:
    questions = []
    for first in range(len(scenes)):
        for second in range(first + 1, len(scenes)):
            combo = _shared(scenes[first], scenes[second])
            if combo is None:
                continue
            a, b = first + 1, second + 1
            forms = (
                f"What do image {a} and image {b} have in common?",
                f"Which object appears in both image {a} and image {b}?",
                f"What is shared by image {a} and image {b}?",
                f"What can be seen in both image {a} and image {b}?",
            )
            answer = f"{_a(combo[0])} {combo[0]} {combo[1]}"
            key = ("cross_common", first, second)
            questions.append(Question("cross_common", None, key, answer, forms))
    return questions


def _shared(first: Scene, second: Scene) -> tuple[str, str] | None:
    """The one (colour, shape) two scenes share, when they share exactly one and no other
    colour or shape; else None."""
    combos = first.combos() & second.combos()
    colours = {c for c, _ in first.combos()} & {c for c, _ in second.combos()}
    shapes = {s for _, s in first.combos()} & {s for _, s in second.combos()}
    if len(combos) == 1 and len(colours) == 1 and len(shapes) == 1:
        return next(iter(combos))
    return None


_SINGLE_IMAGE = {
    "color": _color_questions,
    "shape": _shape_questions,
    "count": _count_questions,
    "position": _position_questions,
    "word": _word_questions,
}
_CROSS_IMAGE = {
    "cross_which": _cross_which_questions,
    "cross_count": _cross_count_questions,
    "cross_common": _cross_common_questions,
}
