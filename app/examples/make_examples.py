"""Draw the web chat's example images (committed as PNGs; rerun to rebuild them identically).

    python app/examples/make_examples.py

Simple coloured shapes on white, like the synthetic multi-image data the model is trained on.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
MARGIN = 24
WHITE = (255, 255, 255)
SHAPES = {
    "red_circle.png": ("circle", (220, 40, 40)),
    "blue_square.png": ("square", (40, 80, 220)),
    "green_triangle.png": ("triangle", (30, 160, 60)),
    "yellow_star.png": ("star", (240, 200, 20)),
}


def star_points(center: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((center + radius * math.cos(angle), center + radius * math.sin(angle)))
    return points


def draw(shape: str, color: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), WHITE)
    pen = ImageDraw.Draw(image)
    low, high = MARGIN, SIZE - MARGIN
    if shape == "circle":
        pen.ellipse((low, low, high, high), fill=color)
    elif shape == "square":
        pen.rectangle((low, low, high, high), fill=color)
    elif shape == "triangle":
        pen.polygon([(SIZE / 2, low), (high, high), (low, high)], fill=color)
    elif shape == "star":
        pen.polygon(star_points(SIZE / 2, SIZE / 2 - MARGIN / 2, SIZE / 5), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def main(folder: Path = Path(__file__).parent) -> None:
    for name, (shape, color) in SHAPES.items():
        draw(shape, color).save(folder / name, optimize=True)
        print(f"wrote {folder / name} ({(folder / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
