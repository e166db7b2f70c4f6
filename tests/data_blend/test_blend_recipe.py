"""Recipes: the shipped YAML files load; bad recipes fail with messages that say what to fix."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import yaml

from data_blend.recipe import BlendRecipe, RecipeError, SourceSpec
from data_blend.records import load_blended
from data_blend.run import run_blend
from data_blend.sources.synthetic import FAMILIES
from training.config import TrainConfig

RECIPES = Path(__file__).resolve().parents[2] / "data_blend" / "recipes"


def test_shipped_recipes_load():
    train = BlendRecipe.from_yaml(RECIPES / "embedded_train.yaml")
    assert (train.max_group, train.max_images, train.max_length) == (3, 6, 1024)
    # The shipped checkpoint, step 640 of the embedded recipe (README "The embedded default"),
    # read every conversation of its blend at most once; the whole 800-step schedule, which does
    # not fit the CPU budget, starts a second pass over the blend in its last 50 steps.
    trainer = TrainConfig.from_yaml(RECIPES.parents[1] / "training" / "recipes" / "embedded.yaml")
    (stage,) = trainer.stages
    per_step = stage.batch_size * stage.grad_accum
    assert trainer.data.train == str(train.output)
    assert 640 * per_step <= train.num_samples < stage.steps * per_step < 2 * train.num_samples
    assert [(s.name, s.type, s.split, s.num_samples, s.seed) for s in train.sources] == [
        ("synthetic_multi", "synthetic", "train", 100000, 1),
        ("synthetic_single", "synthetic", "train", 100000, 2),
    ]
    assert {s.config["image_size"] for s in train.sources} == {96}
    assert train.sources[1].config["max_images"] == 1  # the single-image samples get merged
    heldout = BlendRecipe.from_yaml(RECIPES / "embedded_heldout.yaml")
    assert (heldout.num_samples, heldout.max_group, heldout.sampling) == (400, 1, "sequential")
    assert heldout.sources[0].split == "heldout" and heldout.sources[0].config["balanced"]
    tiny = BlendRecipe.from_yaml(RECIPES / "synthetic_tiny.yaml")
    assert tiny.sources[0].seed == tiny.seed == 0


def test_heldout_recipe_gives_single_questions_with_an_exact_family_balance(tmp_path):
    recipe = BlendRecipe.from_yaml(RECIPES / "embedded_heldout.yaml")
    source = dataclasses.replace(recipe.sources[0], num_samples=16)
    recipe = dataclasses.replace(
        recipe, output=tmp_path / "heldout", num_samples=16, sources=(source,)
    )
    run_blend(recipe, progress=False)
    dataset = load_blended(recipe.output)
    assert all(len(families) == 1 for families in dataset["families"])
    assert Counter(f for (f,) in dataset["families"]) == dict.fromkeys(FAMILIES, 2)
    assert dataset["id"][:2] == [
        "000000:synthetic_heldout/heldout-1-0",
        "000001:synthetic_heldout/heldout-1-1",
    ]


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base(**changes):
    recipe = {
        "output": "out",
        "num_samples": 10,
        "sources": [{"name": "s", "type": "synthetic"}],
    }
    recipe.update(changes)
    return recipe


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = BlendRecipe.from_yaml(write(tmp_path, base(seed=4)))
    assert recipe == BlendRecipe(
        output=Path("out"),
        sources=(SourceSpec("s", "synthetic", 1.0, split="train", num_samples=100_000, seed=4),),
        num_samples=10,
        seed=4,
    )
    assert recipe.to_dict()["sources"] == [
        {
            "name": "s",
            "type": "synthetic",
            "weight": 1.0,
            "split": "train",
            "num_samples": 100000,
            "seed": 4,
        }
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (base(outptu="x"), "unknown key\\(s\\) \\['outptu'\\]; known keys: output, sources"),
        ({"output": "o", "num_samples": 1}, "missing required key\\(s\\): sources"),
        (base(sources=[]), "'sources' must be a non-empty list"),
        (base(num_samples=0), "'num_samples' must be an integer >= 1, got 0"),
        (base(max_group="3"), "'max_group' must be an integer >= 1, got '3'"),
        (base(sampling="shuffled"), "sampling must be 'random' or 'sequential'"),
        (base(overwrite="yes"), "'overwrite' must be true or false"),
        (
            base(sources=[{"name": "a", "type": "llava"}]),
            "sources\\[0\\] \\(a\\): missing required key\\(s\\): path \\(the LLaVA JSON file\\)",
        ),
        (
            base(sources=[{"name": "a", "type": "coco"}]),
            "'type' must be one of llava, hf_columns, dialogue, synthetic, got 'coco'",
        ),
        (
            base(sources=[{"name": "a+b", "type": "synthetic"}]),
            "'name' must be letters, digits",
        ),
        (
            base(sources=[{"name": "a", "type": "synthetic", "weight": 0}]),
            "'weight' must be a positive number, got 0",
        ),
        (
            base(sources=[{"name": "a", "type": "synthetic"}, {"name": "a", "type": "synthetic"}]),
            "source names must be unique; repeated: \\['a'\\]",
        ),
        (
            base(sources=[{"name": "a", "type": "synthetic", "split": "test"}]),
            "synthetic 'split' must be train or heldout, got 'test'",
        ),
        (
            base(sources=[{"name": "a", "type": "synthetic", "config": {"img_size": 9}}]),
            "sources\\[0\\] \\(a\\): config: unknown synthetic config key\\(s\\) \\['img_size'\\]",
        ),
        (
            base(sources=[{"name": "a", "type": "synthetic", "config": {"image_size": 8}}]),
            "config: image_size must be in 32..1024, got 8",
        ),
        (
            base(sources=[{"name": "a", "type": "llava", "path": "x.json", "columns": {}}]),
            "unknown key\\(s\\) \\['columns'\\]; known keys: name, type, weight, path",
        ),
        (
            base(
                sources=[
                    {
                        "name": "a",
                        "type": "hf_columns",
                        "path": "d",
                        "columns": {"image": "i", "question": "q"},
                    }
                ]
            ),
            "'columns' lacks answer",
        ),
    ],
)
def test_bad_recipes_say_what_to_fix(tmp_path, data, message):
    with pytest.raises(RecipeError, match=message):
        BlendRecipe.from_yaml(write(tmp_path, data))


def test_unreadable_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml does not exist"):
        BlendRecipe.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("output: [")
    with pytest.raises(RecipeError, match="not valid YAML"):
        BlendRecipe.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping of keys"):
        BlendRecipe.from_yaml(tmp_path / "list.yaml")
