"""Source adapters on tiny fixture files: parsing, image placement, bad records skipped and
counted by reason."""

from __future__ import annotations

import io
import json

import datasets
import pytest
from blend_factories import BLUE, GREEN, RED, make_image, save_image, write_json
from PIL import Image

from data_blend.sources.dialogue import DialogueSource
from data_blend.sources.hf_columns import HFColumnsSource
from data_blend.sources.llava import LlavaSource
from visualchat.messages import ImagePart, TextPart


def human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


def structure(sample) -> list[list[str]]:
    """Each round's user parts as "IMG:<file name>" / text, then the answer."""
    return [
        [f"IMG:{p.image.name}" if isinstance(p, ImagePart) else p.text for p in r.user]
        + [f"-> {r.answer}"]
        for r in sample.rounds
    ]


@pytest.fixture
def image_dir(tmp_path):
    for name, colour in (("a.png", RED), ("b.png", GREEN), ("c.png", BLUE)):
        save_image(tmp_path / "images" / name, colour)
    return tmp_path / "images"


# --- LLaVA ----------------------------------------------------------------------------------


def test_llava_parses_markers_and_skips_bad_records(tmp_path, image_dir):
    records = [
        {"id": "ok1", "image": "a.png", "conversations": [human("<image>\nWhat is it?"), gpt("A")]},
        {"id": "ok2", "image": "b.png", "conversations": [human("Describe it."), gpt("Green.")]},
        {
            "id": "ok3",
            "image": "c.png",
            "conversations": [human("Look:\n<image>"), gpt("Blue."), human("Sure?"), gpt("Yes.")],
        },
        {"id": "nofile", "image": "zzz.png", "conversations": [human("Hi"), gpt("Hello")]},
        {"id": "noimage", "conversations": [human("Hi"), gpt("Hello")]},
        {"id": "noconv", "image": "a.png"},
        {"id": "twohuman", "image": "a.png", "conversations": [human("Hi"), human("Hey")]},
        {"id": "odd", "image": "a.png", "conversations": [human("Hi"), gpt("A"), human("B")]},
        {"id": "reply", "image": "a.png", "conversations": [human("Hi"), gpt("<image> no")]},
        {"id": "two", "image": "a.png", "conversations": [human("<image><image>"), gpt("A")]},
        "not an object",
    ]
    source = LlavaSource(write_json(tmp_path / "llava.json", records), image_dir, "llava")

    assert [s.sample_id for s in source] == ["llava/ok1", "llava/ok2", "llava/ok3"]
    assert [structure(s) for s in source] == [
        [["IMG:a.png", "What is it?", "-> A"]],
        [["IMG:b.png", "Describe it.", "-> Green."]],
        [["Look:", "IMG:c.png", "-> Blue."], ["Sure?", "-> Yes."]],
    ]
    assert source.skips.as_dict() == {
        "image_marker_in_reply": 1,
        "missing_field": 2,
        "missing_image": 1,
        "non_alternating_turns": 2,
        "not_an_object": 1,
        "too_many_image_markers": 1,
    }
    assert all(s.source == "llava" and s.scenes == [""] for s in source)
    assert source[1].families == [""]


def test_llava_images_dir_defaults_to_the_json_folder_and_jsonl_skips_bad_lines(tmp_path):
    save_image(tmp_path / "x.png")
    good = {"id": 7, "image": "x.png", "conversations": [human("Q"), gpt("A")]}
    path = tmp_path / "data.jsonl"
    path.write_text(f"{write_json_line(good)}\n{{broken\n\n{write_json_line(good)}\n")
    source = LlavaSource(path, name="l")
    assert len(source) == 2
    assert source[0].sample_id == "l/7"
    assert source.skips.as_dict() == {"invalid_json": 1}
    assert len(LlavaSource(path, name="l", max_samples=1)) == 1


def write_json_line(record) -> str:
    return json.dumps(record)


def test_llava_refuses_unusable_files_with_clear_errors(tmp_path, image_dir):
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        LlavaSource(tmp_path / "missing.json", image_dir, "l")
    with pytest.raises(ValueError, match="must hold a JSON list of records, got dict"):
        LlavaSource(write_json(tmp_path / "d.json", {"a": 1}), image_dir, "l")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        LlavaSource(tmp_path / "bad.json", image_dir, "l")
    with pytest.raises(FileNotFoundError, match="images_dir .*nowhere is not a folder"):
        LlavaSource(write_json(tmp_path / "e.json", []), tmp_path / "nowhere", "l")


# --- dialogue -------------------------------------------------------------------------------


def test_dialogue_markers_consume_images_in_order_extra_images_go_first(tmp_path, image_dir):
    records = [
        {
            "id": "d1",
            "images": ["a.png", "b.png"],
            "conversations": [
                human("Here <image> and there <image>. Same?"),
                gpt("No."),
                human("Which is red?"),
                gpt("Image 1."),
            ],
        },
        {
            "id": "d2",
            "images": ["a.png", "b.png", "c.png"],
            "conversations": [human("Compare."), gpt("Ok."), human("And <image>?"), gpt("Blue.")],
        },
        {"id": "many", "images": ["a.png"], "conversations": [human("<image> <image>"), gpt("x")]},
        {"id": "none", "images": [], "conversations": [human("Q"), gpt("A")]},
        {"id": "gone", "images": ["a.png", "nope.png"], "conversations": [human("Q"), gpt("A")]},
        {"id": "badpath", "images": ["a.png", 3], "conversations": [human("Q"), gpt("A")]},
    ]
    source = DialogueSource(write_json(tmp_path / "dia.json", records), image_dir, "dia")

    assert [structure(s) for s in source] == [
        [
            ["Here", "IMG:a.png", "and there", "IMG:b.png", ". Same?", "-> No."],
            ["Which is red?", "-> Image 1."],
        ],
        # c.png is taken by the marker of turn 2; a.png and b.png open the first turn
        [["IMG:b.png", "IMG:c.png", "Compare.", "-> Ok."], ["And", "IMG:a.png", "?", "-> Blue."]],
    ]
    assert [s.num_images for s in source] == [2, 3]
    assert source.skips.as_dict() == {
        "missing_field": 2,
        "missing_image": 1,
        "too_many_image_markers": 1,
    }


# --- HF columns -----------------------------------------------------------------------------


def test_hf_columns_pil_column_with_bad_rows_skipped():
    dataset = datasets.Dataset.from_dict(
        {
            "img": [make_image(RED), make_image(GREEN), None, make_image(BLUE)],
            "q": ["What colour?", "<image> Colour?", "Q", ""],
            "a": ["red", "green", "A", "blue"],
            "qid": ["r", "g", "n", "b"],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "q": datasets.Value("string"),
                "a": datasets.Value("string"),
                "qid": datasets.Value("string"),
            }
        ),
    )
    columns = {"image": "img", "question": "q", "answer": "a", "id": "qid"}
    source = HFColumnsSource(dataset, columns, name="vqa")

    assert len(source) == 2
    assert [s.sample_id for s in source] == ["vqa/r", "vqa/g"]
    first = source[0].rounds[0]
    assert isinstance(first.user[0], ImagePart) and isinstance(first.user[0].image, bytes)
    assert Image.open(io.BytesIO(first.user[0].image)).getpixel((0, 0)) == RED
    assert first.user[1] == TextPart("What colour?") and first.answer == "red"
    assert [type(p).__name__ for p in source[1].rounds[0].user] == ["ImagePart", "TextPart"]
    assert source.skips.as_dict() == {"missing_field": 1, "missing_image": 1}


def test_hf_columns_path_and_bytes_columns_and_families(tmp_path, image_dir):
    buffer = io.BytesIO()
    make_image(BLUE).save(buffer, format="PNG")
    dataset = datasets.Dataset.from_dict(
        {
            "path": ["a.png", "missing.png", str(image_dir / "b.png")],
            "raw": [buffer.getvalue(), b"", buffer.getvalue()],
            "q": ["Q1", "Q2", "Q3"],
            "a": ["A1", "A2", "A3"],
            "fam": ["color", "count", None],
        }
    )
    by_path = HFColumnsSource(
        dataset,
        {"image": "path", "question": "q", "answer": "a", "family": "fam"},
        name="p",
        images_dir=image_dir,
    )
    assert [s.images for s in by_path] == [[image_dir / "a.png"], [image_dir / "b.png"]]
    assert [s.families for s in by_path] == [["color"], [""]]
    assert [s.sample_id for s in by_path] == ["p/0", "p/2"]
    assert by_path.skips.as_dict() == {"missing_image": 1}

    by_bytes = HFColumnsSource(dataset, {"image": "raw", "question": "q", "answer": "a"}, "b")
    assert [s.sample_id for s in by_bytes] == ["b/0", "b/2"]
    assert by_bytes.skips.as_dict() == {"missing_image": 1}


def test_hf_columns_from_saved_folder_and_mapping_errors(tmp_path):
    dataset = datasets.Dataset.from_dict(
        {"img": [make_image(RED)], "q": ["Q"], "a": ["A"]},
        features=datasets.Features(
            {"img": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("string")}
        ),
    )
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved"))
    columns = {"image": "img", "question": "q", "answer": "a"}
    source = HFColumnsSource.from_path(tmp_path / "saved", columns, split="validation", name="s")
    assert [s.sample_id for s in source] == ["s/0"]
    with pytest.raises(ValueError, match="split 'train' not in .* \\(splits: validation\\)"):
        HFColumnsSource.from_path(tmp_path / "saved", columns, split="train", name="s")
    with pytest.raises(ValueError, match="missing: answer"):
        HFColumnsSource(dataset, {"image": "img", "question": "q"}, "s")
    with pytest.raises(
        ValueError, match="column\\(s\\) ans not in the dataset \\(its columns: img, q, a\\)"
    ):
        HFColumnsSource(dataset, {"image": "img", "question": "q", "answer": "ans"}, "s")
    with pytest.raises(ValueError, match="unknown column role\\(s\\) caption"):
        HFColumnsSource(dataset, {**columns, "caption": "q"}, "s")
