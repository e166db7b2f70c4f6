"""The synthetic world: determinism, families, answers recomputed from the scene metadata,
held-out disjointness, rendering, labels."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from data_blend.sources.scenes import HELDOUT_FRACTION, TEXT_COLOUR, Group, Scene, render
from data_blend.sources.synthetic import (
    COLOURS,
    FAMILIES,
    REGIONS,
    SHAPES,
    WORDS,
    SyntheticConfig,
    SyntheticSource,
    SyntheticWorld,
    scene_labels,
)
from visualchat.messages import ImagePart, TextPart

_COLOUR_WORD = re.compile(rf"\b({'|'.join(COLOURS)})\b")
_SHAPE_WORD = re.compile(rf"\b({'|'.join(SHAPES)})s?\b")
_IMAGE_NUMBER = re.compile(r"\bimage (\d+)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def train_samples():
    return list(SyntheticWorld().samples(60, "train", seed=7))


def flatten(sample):
    return [
        ([p.text if isinstance(p, TextPart) else "IMG" for p in r.user], r.answer, r.family)
        for r in sample.rounds
    ]


def test_same_seed_same_samples_pixel_for_pixel():
    world = SyntheticWorld(SyntheticConfig(image_size=48))
    first, second = list(world.samples(4, "train", 3)), list(world.samples(4, "train", 3))
    assert [s.sample_id for s in first] == [f"synthetic/train-3-{i}" for i in range(4)]
    assert [flatten(s) for s in first] == [flatten(s) for s in second]
    assert [s.scenes for s in first] == [s.scenes for s in second]
    assert [[im.tobytes() for im in s.images] for s in first] == [
        [im.tobytes() for im in s.images] for s in second
    ]
    other = list(world.samples(4, "train", 4))
    assert [s.scenes for s in other] != [s.scenes for s in first]


def test_all_families_appear_with_sample_shapes_in_range(train_samples):
    assert {f for s in train_samples for f in s.families} == set(FAMILIES)
    for sample in train_samples:
        assert 1 <= sample.num_images <= 4 and 1 <= len(sample.rounds) <= 4
        # every image in the first user turn, before its question
        assert sample.rounds[0].num_images == sample.num_images
        assert all(r.num_images == 0 for r in sample.rounds[1:])
        assert len(sample.scenes) == sample.num_images
        if sample.num_images == 1:
            assert not {"cross_which", "cross_count", "cross_common"} & set(sample.families)


def _image_of(question: str, num_images: int) -> int:
    numbers = _IMAGE_NUMBER.findall(question)
    if num_images == 1:
        assert not numbers, question
        return 0
    assert len(numbers) == 1, question
    return int(numbers[0]) - 1


def expected_answer(question: str, family: str, scenes: list[dict]) -> str:
    """The answer recomputed from the scene JSON, independently of the generator's code."""
    colours = _COLOUR_WORD.findall(question)
    shapes = _SHAPE_WORD.findall(question)
    if family == "cross_which":
        holders = [
            i
            for i, s in enumerate(scenes)
            if any(g["colour"] == colours[0] and g["shape"] == shapes[0] for g in s["groups"])
        ]
        assert len(holders) == 1, question
        return f"Image {holders[0] + 1}"
    if family == "cross_count":
        return str(
            sum(
                any(
                    g["shape"] == shapes[0] and (not colours or g["colour"] == colours[0])
                    for g in s["groups"]
                )
                for s in scenes
            )
        )
    if family == "cross_common":
        first, second = (scenes[int(n) - 1] for n in _IMAGE_NUMBER.findall(question))
        shared = {(g["colour"], g["shape"]) for g in first["groups"]} & {
            (g["colour"], g["shape"]) for g in second["groups"]
        }
        assert len(shared) == 1, question
        colour, shape = shared.pop()
        return f"{'an' if colour == 'orange' else 'a'} {colour} {shape}"
    groups = scenes[_image_of(question, len(scenes))]["groups"]
    if family == "word":
        return scenes[_image_of(question, len(scenes))]["word"]
    if family == "color":
        (group,) = [g for g in groups if g["shape"] == shapes[0]]
        return group["colour"]
    if family == "shape":
        (group,) = [g for g in groups if g["colour"] == colours[0]]
        return group["shape"]
    if family == "position":
        (group,) = [g for g in groups if g["colour"] == colours[0] and g["shape"] == shapes[0]]
        return group["region"]
    if family == "count":
        matching = [
            g
            for g in groups
            if (not colours or g["colour"] == colours[0])
            and (not shapes or g["shape"] == shapes[0])
        ]
        return str(sum(len(g["positions"]) for g in matching))
    raise AssertionError(family)


def test_answers_match_the_scene_metadata(train_samples):
    checked = 0
    for sample in train_samples:
        scenes = [json.loads(scene) for scene in sample.scenes]
        for round_ in sample.rounds:
            question = " ".join(p.text for p in round_.user if isinstance(p, TextPart))
            assert round_.answer == expected_answer(question, round_.family, scenes), question
            checked += 1
    assert checked >= 100


def test_answer_formats_are_canonical(train_samples):
    patterns = {
        "color": f"({'|'.join(COLOURS)})",
        "shape": f"({'|'.join(SHAPES)})",
        "count": "[1-6]",
        "position": f"({'|'.join(REGIONS)})",
        "word": f"({'|'.join(WORDS)})",
        "cross_which": "Image [1-4]",
        "cross_count": "[1-4]",
        "cross_common": f"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})",
    }
    for sample in train_samples:
        for round_ in sample.rounds:
            assert re.fullmatch(patterns[round_.family], round_.answer), round_


def test_single_image_questions_in_multi_image_samples_name_their_image(train_samples):
    for sample in train_samples:
        for round_ in sample.rounds:
            question = round_.user[-1].text
            if round_.family in ("color", "shape", "count", "position", "word"):
                assert len(_IMAGE_NUMBER.findall(question)) == (sample.num_images > 1), question


def test_train_and_heldout_scenes_are_disjoint():
    world = SyntheticWorld(SyntheticConfig(image_size=48, max_rounds=1))
    keys = {}
    for split in ("train", "heldout"):
        scenes = [Scene.from_json(t) for s in world.samples(40, split, 0) for t in s.scenes]
        keys[split] = {scene.key() for scene in scenes}
        for key in keys[split]:
            bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
            assert (bucket < HELDOUT_FRACTION) == (split == "heldout")
    assert len(keys["train"]) >= 60 and len(keys["heldout"]) >= 60
    assert not keys["train"] & keys["heldout"]


def test_render_size_background_and_shapes_where_the_scene_says():
    world = SyntheticWorld(SyntheticConfig(word_probability=1.0))
    sample = world.sample(0)
    for image, text in zip(sample.images, sample.scenes, strict=True):
        scene = Scene.from_json(text)
        assert image.size == (96, 96) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == scene.background
        for group in scene.groups:
            for x, y in group.positions:
                assert image.getpixel((x, y)) == COLOURS[group.colour]
        x0, y0, x1, y1 = scene.word_box
        assert y1 - y0 >= 15
        word_pixels = image.crop((x0, y0, x1, y1)).getdata()
        assert (
            sum(
                max(abs(a - b) for a, b in zip(p, TEXT_COLOUR, strict=True)) < 40
                for p in word_pixels
            )
            >= 40
        )
    small = SyntheticWorld(SyntheticConfig(image_size=64)).sample(0)
    assert {im.size for im in small.images} == {(64, 64)}


def test_scene_labels_exact():
    scene = Scene(
        96,
        (250, 250, 250),
        (
            Group("red", "circle", "small", "left", ((10, 48), (26, 48))),
            Group("blue", "star", "large", "top", ((48, 14),)),
        ),
        "CAT",
        (60, 70, 90, 88),
    )
    labels = scene_labels(scene.to_json())
    num_shapes = len(SHAPES)
    red_circle = list(COLOURS).index("red") * num_shapes + SHAPES.index("circle")
    blue_star = list(COLOURS).index("blue") * num_shapes + SHAPES.index("star")
    assert red_circle == 0 and blue_star == 2 * num_shapes + 3
    expected_presence = [0] * (len(COLOURS) * num_shapes)
    expected_presence[red_circle] = expected_presence[blue_star] = 1
    expected_regions = [-1] * len(expected_presence)
    expected_regions[red_circle], expected_regions[blue_star] = 0, 2
    assert labels == {
        "presence": expected_presence,
        "shape_counts": [2, 0, 0, 1, 0],
        "colour_counts": [2, 0, 1] + [0] * (len(COLOURS) - 3),
        "word_id": 1,
        "regions": expected_regions,
        "num_objects": 3,
    }
    assert scene_labels(Scene(96, (250, 250, 250), scene.groups))["word_id"] == 0
    assert render(scene).getpixel((48, 14)) == COLOURS["blue"]


def test_balanced_config_cycles_families_and_limits_rounds():
    config = SyntheticConfig(image_size=48, max_rounds=1, balanced=True)
    samples = list(SyntheticWorld(config).samples(16, "heldout", 0))
    assert [s.families for s in samples] == [[f] for f in FAMILIES * 2]


def test_family_weights_select_families():
    config = SyntheticConfig.from_dict({"image_size": 48, "families": {"word": 1, "count": 0}})
    samples = list(SyntheticWorld(config).samples(8))
    assert {f for s in samples for f in s.families} == {"word"}


def test_config_errors_are_actionable():
    with pytest.raises(ValueError, match="unknown question families \\['colour'\\]"):
        SyntheticConfig(families={"colour": 1.0})
    with pytest.raises(ValueError, match="need max_images >= 2"):
        SyntheticConfig(max_images=1)
    with pytest.raises(ValueError, match="unknown synthetic config key\\(s\\) \\['size'\\]"):
        SyntheticConfig.from_dict({"size": 96})
    with pytest.raises(ValueError, match="split must be one of train, heldout"):
        SyntheticSource(SyntheticWorld(), "test")  # type: ignore[arg-type]


def test_source_is_a_lazy_pool():
    source = SyntheticSource(SyntheticWorld(SyntheticConfig(image_size=48)), num_samples=5, seed=2)
    assert len(source) == 5
    assert source[3].sample_id == "synthetic/train-2-3"
    assert isinstance(source[3].rounds[0].user[0], ImagePart)
    with pytest.raises(IndexError):
        source[5]
