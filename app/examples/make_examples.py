"""Draw the web chat's example images (committed as PNGs; rerun to rebuild them identically).

    python app/examples/make_examples.py

They are scenes of the synthetic multi-image world the embedded model is trained on
(data_blend.sources.scenes), drawn from the held-out split so the model has never seen them,
and chosen so that each example question in app/ui.py has one right answer:

- scene_word.png has a word; scene_shapes.png has none ("What word is written in image 2?");
- exactly one of scene_shapes.png, scene_star.png, scene_word.png has a yellow star
  ("Which image has a yellow star?" -> Image 2);
- scene_shapes.png has circles ("How many circles are there?").
"""

from __future__ import annotations

import random
from pathlib import Path

from data_blend.sources.scenes import Scene, generate_scene, render

SIZE = 96  # the embedded model's input size: no resampling between the file and the model
SEED = 7
YELLOW_STAR = ("yellow", "star")


def _shapes(scene: Scene) -> set[str]:
    return {group.shape for group in scene.groups}


def make_scenes(seed: int = SEED) -> dict[str, Scene]:
    rng = random.Random(seed)
    shapes = generate_scene(
        rng,
        SIZE,
        "heldout",
        with_word=False,
        forbidden=[YELLOW_STAR],
        accept=lambda s: "circle" in _shapes(s) and len(s.groups) >= 2,
    )
    star = generate_scene(rng, SIZE, "heldout", with_word=False, required=YELLOW_STAR)
    word = generate_scene(rng, SIZE, "heldout", with_word=True, forbidden=[YELLOW_STAR])
    return {"scene_shapes.png": shapes, "scene_star.png": star, "scene_word.png": word}


def main(folder: Path = Path(__file__).parent) -> None:
    for name, scene in make_scenes().items():
        render(scene).save(folder / name, optimize=True)
        print(f"wrote {folder / name}: {scene.key()}")


if __name__ == "__main__":
    main()
