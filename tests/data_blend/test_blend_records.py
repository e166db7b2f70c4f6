"""The record format: conversation <-> row, the Features, load_blended's errors."""

from __future__ import annotations

import io
import json

import datasets
import pytest
from blend_factories import BLUE, GREEN, RED, make_image, make_sample
from PIL import Image

from data_blend.records import (
    FEATURES,
    FORMAT,
    NotABlendedDatasetError,
    conversation_to_record,
    load_blended,
    png_bytes,
    record_to_conversation,
    sample_to_record,
)
from visualchat.messages import Conversation, ImagePart, Message, TextPart


def two_image_conversation() -> Conversation:
    return Conversation(
        [
            Message(
                "user",
                [ImagePart(make_image(RED)), TextPart("Compare"), ImagePart(make_image(GREEN))],
            ),
            Message("assistant", [TextPart("Different.")]),
            Message("user", [TextPart("Which is red?")]),
            Message("assistant", [TextPart("Image 1")]),
        ]
    )


def test_conversation_to_record_exact():
    record = conversation_to_record(
        two_image_conversation(),
        record_id="r1",
        source="synth",
        families=["", "cross_which"],
        scenes=['{"a": 1}', ""],
    )
    assert record["id"] == "r1" and record["source"] == "synth"
    assert record["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image", "text": None},
                {"type": "text", "text": "Compare"},
                {"type": "image", "text": None},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Different."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which is red?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Image 1"}]},
    ]
    assert record["families"] == ["", "cross_which"]
    assert record["scenes"] == ['{"a": 1}', ""]
    assert [image["path"] for image in record["images"]] == [None, None]
    assert all(image["bytes"].startswith(b"\x89PNG") for image in record["images"])

    defaults = conversation_to_record(two_image_conversation(), record_id="r", source="s")
    assert defaults["families"] == ["", ""] and defaults["scenes"] == ["", ""]
    with pytest.raises(ValueError, match="1 families for 2 assistant turns"):
        conversation_to_record(two_image_conversation(), record_id="r", source="s", families=[""])
    with pytest.raises(ValueError, match="3 scenes for 2 images"):
        conversation_to_record(
            two_image_conversation(), record_id="r", source="s", scenes=["", "", ""]
        )


def test_round_trip_through_a_saved_dataset(tmp_path):
    sample = make_sample(
        "x", "src", ["What?", "Sure?"], ["Red.", "Yes."], colours=[BLUE], families=["color", ""]
    )
    rows = [
        sample_to_record(sample),
        conversation_to_record(two_image_conversation(), record_id="y", source="s"),
    ]
    datasets.Dataset.from_list(rows, features=FEATURES).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT}))

    loaded = load_blended(tmp_path)
    assert loaded.features == FEATURES
    assert loaded["id"] == ["src/x", "y"]
    assert loaded[0]["families"] == ["color", ""]
    assert loaded[0]["scenes"] == ["scene-x-0"]
    for row, original in zip(
        loaded, [sample.to_conversation(), two_image_conversation()], strict=True
    ):
        conversation = record_to_conversation(row)
        assert [(m.role, m.text) for m in conversation.messages] == [
            (m.role, m.text) for m in original.messages
        ]
        assert [[type(p).__name__ for p in m.parts] for m in conversation.messages] == [
            [type(p).__name__ for p in m.parts] for m in original.messages
        ]
        assert [p.image.convert("RGB").tobytes() for p in conversation.images()] == [
            p.image.tobytes() for p in original.images()
        ]
    # Undecoded rows ({"bytes", "path"} dicts) convert too.
    raw = loaded.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))[1]
    assert record_to_conversation(raw).num_images == 2


def test_load_blended_says_what_is_wrong(tmp_path):
    with pytest.raises(NotABlendedDatasetError, match="no manifest.json .*visualchat blend"):
        load_blended(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(
        NotABlendedDatasetError, match="format 'other/9' is not 'visualchat-blend/1'"
    ):
        load_blended(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    with pytest.raises(NotABlendedDatasetError, match="holds no saved dataset"):
        load_blended(tmp_path)


def test_png_bytes_passes_png_through_and_converts_other_formats():
    buffer = io.BytesIO()
    make_image(RED).save(buffer, format="PNG")
    assert png_bytes(buffer.getvalue()) == buffer.getvalue()
    jpeg = io.BytesIO()
    make_image(RED, size=16).save(jpeg, format="JPEG")
    converted = Image.open(io.BytesIO(png_bytes(jpeg.getvalue())))
    assert (converted.format, converted.mode, converted.size) == ("PNG", "RGB", (16, 16))
    assert Image.open(io.BytesIO(png_bytes(make_image(GREEN)))).getpixel((0, 0)) == GREEN
