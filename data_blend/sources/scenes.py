"""Scenes of the synthetic world: what is in one image, how it is drawn, and its labels.

A :class:`Scene` is 1-3 object groups on a plain light background. A group is ``count`` objects
of one shape in one named colour and one size, all in one region of a 3x3 grid (the four edge
cells ``left``, ``right``, ``top``, ``bottom`` and the ``center``); groups of a scene differ in
(colour, shape) and in region. A scene has at most 6 objects and optionally one 3-letter word in
a free corner. Objects and the word never overlap. Everything is drawn with PIL at 2x and
downsampled, so edges are smooth; at the default 96 px a small shape spans 16 px, a large one
24 px, and the word's letters are about 16 px tall.

Held-out split. A scene's :meth:`Scene.key` is its content without pixel positions (groups as
colour, shape, count, size, region; the word). A fixed :data:`HELDOUT_FRACTION` of all keys,
chosen by a hash of the key, belongs to the held-out split; the training split never produces
one of them. The fraction is a constant, not a setting, so that every recipe agrees on the split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "orange": (255, 125, 0),
    "purple": (125, 40, 175),
    "pink": (255, 110, 190),
    "brown": (120, 70, 25),
    "cyan": (0, 185, 205),
    "gray": (125, 125, 125),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
SIZES: tuple[str, ...] = ("small", "large")
REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
CORNERS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
# Short, not colour names, not shape names.
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "KEY", "MAP", "PEN", "BUS", "JAM", "FOX",
)  # fmt: skip
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((250, 250, 250), (245, 242, 232), (236, 242, 248))
TEXT_COLOUR = (35, 35, 35)

HELDOUT_FRACTION = 0.1
MAX_OBJECTS = 6
MAX_GROUPS = 3
# Objects per group, by size: what fits in one 32 px cell at 96 px without overlap.
MAX_COUNT = {"small": 4, "large": 2}

_REFERENCE_SIZE = 96  # geometry below is for 96 px and scales with image_size
_RADIUS = {"small": 8, "large": 12}
_GAP = 2  # min free pixels between objects and around the word
_FONT_SIZE = 22
_SUPERSAMPLE = 2
_REGION_CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
_PLACEMENT_TRIES = 60


@dataclass(frozen=True)
class Group:
    colour: str
    shape: str
    size: str  # "small" | "large"
    region: str  # one of REGIONS; every object of the group is in it
    positions: tuple[tuple[int, int], ...]  # object centres, pixels

    @property
    def count(self) -> int:
        return len(self.positions)

    @property
    def radius(self) -> int:
        return _RADIUS[self.size]  # at 96 px; see Scene.radius


@dataclass(frozen=True)
class Scene:
    image_size: int  # width = height, pixels
    background: tuple[int, int, int]
    groups: tuple[Group, ...]
    word: str | None = None  # one of WORDS
    word_box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) of the drawn word

    def key(self) -> str:
        """Content without positions, canonical: equal keys mean the same scene."""
        content = [(g.colour, g.shape, g.count, g.size, g.region) for g in self.groups]
        return _content_key(content, self.word)

    @property
    def split(self) -> Split:
        return _key_split(self.key())

    def combos(self) -> set[tuple[str, str]]:
        return {(g.colour, g.shape) for g in self.groups}

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return sum(
            g.count
            for g in self.groups
            if (colour is None or g.colour == colour) and (shape is None or g.shape == shape)
        )

    def groups_with(self, colour: str | None = None, shape: str | None = None) -> list[Group]:
        return [
            g
            for g in self.groups
            if (colour is None or g.colour == colour) and (shape is None or g.shape == shape)
        ]

    def radius(self, group: Group) -> float:
        return group.radius * self.image_size / _REFERENCE_SIZE

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> Scene:
        data = json.loads(text) if isinstance(text, str) else dict(text)
        groups = tuple(
            Group(
                g["colour"],
                g["shape"],
                g["size"],
                g["region"],
                tuple((int(x), int(y)) for x, y in g["positions"]),
            )
            for g in data["groups"]
        )
        box = data.get("word_box")
        return cls(
            int(data["image_size"]),
            tuple(data["background"]),  # type: ignore[arg-type]
            groups,
            data.get("word"),
            tuple(box) if box is not None else None,  # type: ignore[arg-type]
        )


# --- generation -----------------------------------------------------------------------------


def generate_scene(
    rng: random.Random,
    image_size: int,
    split: Split,
    *,
    required: tuple[str, str] | None = None,  # a (colour, shape) the scene must contain
    forbidden: Collection[tuple[str, str]] = (),  # (colour, shape)s it must not contain
    word_probability: float = 0.4,
    with_word: bool | None = None,  # force a word (True) or none (False)
    max_groups: int = MAX_GROUPS,
    accept: Callable[[Scene], bool] | None = None,  # an extra condition
    max_tries: int = 2000,
) -> Scene:
    """A random scene of ``split`` that meets the constraints (rejection sampling)."""
    for _ in range(max_tries):
        word = rng.random() < word_probability if with_word is None else with_word
        scene = _random_scene(rng, image_size, split, required, forbidden, word, max_groups)
        if scene is None:
            continue
        if accept is None or accept(scene):
            return scene
    raise RuntimeError(
        f"no {split} scene met the constraints in {max_tries} tries "
        f"(required={required}, {len(forbidden)} forbidden); the constraints are too tight"
    )


def _random_scene(
    rng: random.Random,
    image_size: int,
    split: Split,
    required: tuple[str, str] | None,
    forbidden: Collection[tuple[str, str]],
    with_word: bool,
    max_groups: int,
) -> Scene | None:
    num_groups = rng.randint(1, max_groups)
    combos: list[tuple[str, str]] = [required] if required else []
    while len(combos) < num_groups:
        combo = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if combo not in combos and combo not in forbidden:
            combos.append(combo)
    rng.shuffle(combos)
    regions = rng.sample(REGIONS, num_groups)
    content = []  # (colour, shape, count, size, region) per group
    budget = MAX_OBJECTS
    for i, ((colour, shape), region) in enumerate(zip(combos, regions, strict=True)):
        size = rng.choice(SIZES)
        count = rng.randint(1, min(MAX_COUNT[size], budget - (num_groups - 1 - i)))
        budget -= count
        content.append((colour, shape, count, size, region))
    word = rng.choice(WORDS) if with_word else None
    if _key_split(_content_key(content, word)) != split:
        return None  # decided before placement: placing is the expensive part
    scale = image_size / _REFERENCE_SIZE
    placed: list[tuple[float, float, float]] = []  # (x, y, half-extent) of every object
    groups = []
    for colour, shape, count, size, region in content:
        positions = _place(rng, image_size, region, _RADIUS[size] * scale, count, placed)
        if positions is None:
            return None
        groups.append(Group(colour, shape, size, region, positions))
    box = None if word is None else _place_word(rng, image_size, word, placed)
    if word is not None and box is None:
        return None
    return Scene(image_size, rng.choice(BACKGROUNDS), tuple(groups), word, box)


def _content_key(content: list[tuple[str, str, int, str, str]], word: str | None) -> str:
    return json.dumps({"groups": sorted(content), "word": word}, separators=(",", ":"))


def _key_split(key: str) -> Split:
    """The split a scene key belongs to: a fixed fraction of keys, by hash, is held out."""
    digest = hashlib.sha256(key.encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if bucket < HELDOUT_FRACTION else "train"


def _place(
    rng: random.Random,
    image_size: int,
    region: str,
    radius: float,
    count: int,
    placed: list[tuple[float, float, float]],
) -> tuple[tuple[int, int], ...] | None:
    """Centres of ``count`` objects inside the region's cell, clear of everything placed."""
    cell = image_size / 3
    col, row = _REGION_CELLS[region]
    gap = _GAP * image_size / _REFERENCE_SIZE
    x_range = (max(col * cell, radius + 1), min((col + 1) * cell, image_size - radius - 1))
    y_range = (max(row * cell, radius + 1), min((row + 1) * cell, image_size - radius - 1))
    positions = []
    for _ in range(count):
        for _ in range(_PLACEMENT_TRIES):
            x, y = round(rng.uniform(*x_range)), round(rng.uniform(*y_range))
            if all(
                abs(x - px) >= radius + pr + gap or abs(y - py) >= radius + pr + gap
                for px, py, pr in placed
            ):
                placed.append((x, y, radius))
                positions.append((x, y))
                break
        else:
            return None
    return tuple(positions)


def _place_word(
    rng: random.Random, image_size: int, word: str, placed: list[tuple[float, float, float]]
) -> tuple[int, int, int, int] | None:
    """The word's box in a random corner free of objects, or None when no corner is free."""
    scale = image_size / _REFERENCE_SIZE
    x0, y0, x1, y1 = _font(image_size).getbbox(word, stroke_width=_SUPERSAMPLE)
    width, height = (x1 - x0) / _SUPERSAMPLE, (y1 - y0) / _SUPERSAMPLE
    margin, gap = 3 * scale, _GAP * scale
    for corner in rng.sample(CORNERS, len(CORNERS)):
        left = margin if corner.endswith("left") else image_size - margin - width
        top = margin if corner.startswith("top") else image_size - margin - height
        box = (round(left), round(top), round(left + width), round(top + height))
        if all(
            px + pr + gap <= box[0]
            or px - pr - gap >= box[2]
            or py + pr + gap <= box[1]
            or py - pr - gap >= box[3]
            for px, py, pr in placed
        ):
            return box
    return None


# --- rendering ------------------------------------------------------------------------------


@functools.cache
def _font(image_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = round(_FONT_SIZE * image_size / _REFERENCE_SIZE) * _SUPERSAMPLE
    return ImageFont.load_default(size=size)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of ``scene.image_size`` pixels square."""
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (scene.image_size * s,) * 2, scene.background)
    draw = ImageDraw.Draw(canvas)
    for group in scene.groups:
        radius = scene.radius(group) * s
        for x, y in group.positions:
            _draw_shape(draw, group.shape, x * s, y * s, radius, COLOURS[group.colour])
    if scene.word is not None and scene.word_box is not None:
        font = _font(scene.image_size)
        left, top = font.getbbox(scene.word, stroke_width=s)[:2]
        origin = (scene.word_box[0] * s - left, scene.word_box[1] * s - top)
        draw.text(
            origin, scene.word, TEXT_COLOUR, font=font, stroke_width=s, stroke_fill=TEXT_COLOUR
        )
    return canvas.resize((scene.image_size,) * 2, Image.Resampling.BOX)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple[int, ...]
) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(x, y, r, 0.5 * r), fill=fill)
    elif shape == "hexagon":
        draw.regular_polygon((x, y, r), 6, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _star_points(x: float, y: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        angle = -math.pi / 2 + i * math.pi / 5
        radius = outer if i % 2 == 0 else inner
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return points


# --- labels for vision pretraining ------------------------------------------------------------


def scene_labels(scene: Scene | str | Mapping[str, Any]) -> dict[str, Any]:
    """Fixed-size per-image targets (a scene, its JSON, or its dict):

    - ``presence``: list[int], len(COLOURS) * len(SHAPES); 1 where (colour, shape) is present,
      index ``colour_index * len(SHAPES) + shape_index`` (orders of COLOURS and SHAPES);
    - ``shape_counts``: list[int], len(SHAPES); objects of each shape;
    - ``colour_counts``: list[int], len(COLOURS); objects of each colour;
    - ``word_id``: int; 0 for no word, ``WORDS.index(word) + 1`` otherwise;
    - ``regions``: list[int], len(COLOURS) * len(SHAPES); ``REGIONS.index`` of the group with
      that (colour, shape), -1 where absent;
    - ``num_objects``: int.
    """
    if not isinstance(scene, Scene):
        scene = Scene.from_json(scene)
    colours = list(COLOURS)
    presence = [0] * (len(colours) * len(SHAPES))
    regions = [-1] * len(presence)
    for group in scene.groups:
        index = colours.index(group.colour) * len(SHAPES) + SHAPES.index(group.shape)
        presence[index] = 1
        regions[index] = REGIONS.index(group.region)
    return {
        "presence": presence,
        "shape_counts": [scene.count(shape=shape) for shape in SHAPES],
        "colour_counts": [scene.count(colour=colour) for colour in colours],
        "word_id": 0 if scene.word is None else WORDS.index(scene.word) + 1,
        "regions": regions,
        "num_objects": scene.count(),
    }
