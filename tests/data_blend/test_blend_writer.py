"""The writer (manifest, atomicity) and run_blend end to end."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
from blend_factories import GREEN, RED, make_sample, save_image, write_json

from data_blend.recipe import BlendRecipe, SourceSpec
from data_blend.records import FORMAT, load_blended, record_to_conversation, sample_to_record
from data_blend.run import BlendSummary, run_blend
from data_blend.writer import write_blended
from visualchat import __version__

RECIPES = Path(__file__).resolve().parents[2] / "data_blend" / "recipes"


def records(count: int, fail_after: int | None = None):
    for i in range(count):
        if fail_after is not None and i == fail_after:
            raise KeyError("boom in the middle")
        yield sample_to_record(make_sample(str(i), "s"))


def test_write_blended_writes_data_and_manifest_and_nothing_else(tmp_path):
    output = tmp_path / "out"
    write_blended(output, records(3), lambda: {"seed": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in output.iterdir()) == ["data", "manifest.json"]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest == {"format": FORMAT, "seed": 5, "num_rows": 3}
    assert load_blended(output)["id"] == ["s/0", "s/1", "s/2"]


def test_a_failure_mid_write_leaves_no_output_and_no_temp_folder(tmp_path):
    with pytest.raises(KeyError, match="boom in the middle"):
        write_blended(tmp_path / "out", records(5, fail_after=2), dict)
    assert list(tmp_path.iterdir()) == []

    def bad_manifest():
        raise RuntimeError("manifest failed")

    with pytest.raises(RuntimeError, match="manifest failed"):
        write_blended(tmp_path / "out", records(2), bad_manifest)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_or_replaced_whole(tmp_path):
    output = tmp_path / "out"
    write_blended(output, records(2), dict)
    with pytest.raises(FileExistsError, match="out already exists; .*overwrite: true"):
        write_blended(output, records(1), dict)
    with pytest.raises(KeyError):
        write_blended(output, records(3, fail_after=1), dict, overwrite=True)
    assert len(load_blended(output)) == 2  # the old version is intact
    write_blended(output, records(1), dict, overwrite=True)
    assert len(load_blended(output)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def tiny_recipe(tmp_path: Path) -> BlendRecipe:
    recipe = BlendRecipe.from_yaml(RECIPES / "synthetic_tiny.yaml")
    return dataclasses.replace(recipe, output=tmp_path / "blend")


def test_run_blend_on_the_tiny_recipe(tmp_path):
    recipe = tiny_recipe(tmp_path)
    summary = run_blend(recipe, progress=False)
    dataset = load_blended(recipe.output)
    manifest = json.loads((recipe.output / "manifest.json").read_text())

    assert isinstance(summary, BlendSummary)
    assert summary.output == recipe.output
    assert summary.num_samples == len(dataset) == manifest["num_rows"] == 24
    num_images = sum(len(row) for row in dataset["images"])
    assert summary.num_images == manifest["num_images"] == num_images
    assert summary.num_rounds == sum(len(f) for f in dataset["families"])
    assert (
        summary.families
        == manifest["families"]
        == dict(sorted(Counter(f for fs in dataset["families"] for f in fs).items()))
    )
    assert summary.source_counts == {"synth": manifest["sources"][0]["num_used"]}
    assert summary.source_counts["synth"] >= 24
    assert summary.realised_ratios == {"synth": 1.0}
    assert summary.skipped == {"synth": {}}
    assert summary.length_measure == "approx_num_tokens(num_image_tokens=64)"
    assert manifest["created_by"] == f"visualchat {__version__} (data_blend)"
    assert manifest["seed"] == 0 and manifest["num_samples"] == 24
    assert manifest["sources"][0] == {
        "name": "synth",
        "type": "synthetic",
        "weight": 1.0,
        "ratio": 1.0,
        "num_available": 1000,
        "num_used": summary.source_counts["synth"],
        "realised_ratio": 1.0,
        "skipped": {},
    }
    assert manifest["recipe"]["sources"][0]["config"] == {
        "image_size": 64,
        "max_images": 3,
        "max_rounds": 2,
    }
    assert {im.size for row in dataset["images"][:4] for im in row} == {(64, 64)}
    assert all(len(row["scenes"]) == len(row["images"]) for row in dataset)
    assert all(len(row["families"]) == len(row["messages"]) // 2 for row in dataset)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blend"]


def test_run_blend_is_deterministic_and_respects_length_fn(tmp_path):
    lengths = []

    def length_fn(conversation):
        length = sum(len(m.text.split()) for m in conversation.messages) + 30 * (
            conversation.num_images
        )
        lengths.append(length)
        return length

    runs = []
    for name in ("one", "two"):
        recipe = dataclasses.replace(tiny_recipe(tmp_path), output=tmp_path / name, max_length=80)
        summary = run_blend(recipe, length_fn=length_fn, progress=False)
        assert summary.length_measure == "length_fn"
        # 3-image samples (90 > 80) are dropped whole; merged groups lose trailing rounds.
        assert (summary.num_truncated, summary.dropped) == (6, {"too_long": 24})
        runs.append(load_blended(recipe.output))
    assert runs[0]["id"] == runs[1]["id"]
    assert runs[0]["messages"] == runs[1]["messages"]
    assert runs[0]["scenes"] == runs[1]["scenes"]
    assert all(length_fn(record_to_conversation(row)) <= 80 for row in runs[0])
    assert max(lengths) > 80  # the limit did bind


def test_run_blend_mixes_file_and_synthetic_sources_with_skips(tmp_path):
    save_image(tmp_path / "img" / "a.png", RED)
    save_image(tmp_path / "img" / "b.png", GREEN)
    conversation = [
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "red"},
    ]
    llava = write_json(
        tmp_path / "llava.json",
        [
            {"id": "1", "image": "a.png", "conversations": conversation},
            {"id": "2", "image": "b.png", "conversations": conversation},
            {"id": "3", "image": "gone.png", "conversations": conversation},
            {"id": "4", "image": "a.png"},
        ],
    )
    recipe = BlendRecipe(
        output=tmp_path / "mix",
        sources=(
            SourceSpec("real", "llava", 1.0, path=llava, images_dir=tmp_path / "img"),
            SourceSpec(
                "synth",
                "synthetic",
                1.0,
                split="train",
                num_samples=50,
                seed=0,
                config={"image_size": 48},
            ),
        ),
        num_samples=30,
        seed=3,
        max_group=2,
    )
    summary = run_blend(recipe, progress=False)
    manifest = json.loads((recipe.output / "manifest.json").read_text())
    assert summary.skipped == {"real": {"missing_field": 1, "missing_image": 1}, "synth": {}}
    assert [s["skipped"] for s in manifest["sources"]] == [
        {"missing_field": 1, "missing_image": 1},
        {},
    ]
    assert [s["num_available"] for s in manifest["sources"]] == [2, 50]
    assert summary.source_counts == {"real": 10, "synth": 22}
    assert summary.realised_ratios == {"real": 10 / 32, "synth": 22 / 32}
    assert [s["realised_ratio"] for s in manifest["sources"]] == [10 / 32, 22 / 32]
    dataset = load_blended(recipe.output)
    assert Counter(dataset["source"]) == {"synth": 20, "real": 8, "real+synth": 1, "synth+real": 1}
    assert all(scene == "" for row in dataset if row["source"] == "real" for scene in row["scenes"])
    merged = next(row for row in dataset if row["source"] == "real+synth")
    assert merged["messages"][0]["content"] == [
        {"type": "image", "text": None},
        {"type": "text", "text": "In image 1, what colour?"},
    ]
    assert "image 2" in merged["messages"][2]["content"][1]["text"]


def test_run_blend_refuses_an_existing_output_before_reading_sources(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe.output.mkdir()
    with pytest.raises(FileExistsError, match="overwrite: true"):
        run_blend(recipe, progress=False)
