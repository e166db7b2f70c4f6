"""Image references rewritten to the merged numbering."""

from __future__ import annotations

import pytest
from blend_factories import make_image

from data_blend.renumber import refer_parts_to_image, refer_to_image, refers_to, renumber
from visualchat.messages import ImagePart, TextPart


def test_renumber_maps_singular_and_plural_references():
    text = "Compare image 1 and Image 2. Images 1, 2 and 3 differ; pictures 1 & 2; photo 2; image 9"
    assert renumber(text, {1: 4, 2: 5, 3: 6}) == (
        "Compare image 4 and Image 5. Images 4, 5 and 6 differ; pictures 4 & 5; photo 5; image 9"
    )
    assert renumber("image 1 and 3 cats", {1: 2, 3: 7}) == "image 2 and 3 cats"
    assert renumber("image 12", {1: 2}) == "image 12"
    assert renumber("image 1", {}) == "image 1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What colour is the star?", "In image 2, what colour is the star?"),
        ("What word is written in the image?", "What word is written in image 2?"),
        ("The image shows what?", "Image 2 shows what?"),
        ("Describe this picture.", "Describe image 2."),
        ("Is image 2 red?", "Is image 2 red?"),
        ("CAT or DOG?", "In image 2, CAT or DOG?"),
        ("I wonder what this is.", "In image 2, I wonder what this is."),
    ],
)
def test_refer_to_image(text, expected):
    assert refer_to_image(text, 2) == expected


def test_refer_parts_to_image_keeps_images_and_prefixes_the_first_text():
    image = ImagePart(make_image())
    parts = [image, TextPart("Look closely."), TextPart("What is it?")]
    assert refer_parts_to_image(parts, 3) == [
        image,
        TextPart("In image 3, look closely."),
        TextPart("What is it?"),
    ]
    parts = [TextPart("Look."), image, TextPart("What is in the image?")]
    assert refer_parts_to_image(parts, 3) == [
        TextPart("Look."),
        image,
        TextPart("What is in image 3?"),
    ]
    assert refer_parts_to_image([image], 3) == [image]


def test_refers_to():
    assert refers_to("Images 1 and 3", 3)
    assert not refers_to("Images 1 and 3", 2)
    assert not refers_to("the image", 1)
