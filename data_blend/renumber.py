"""Rewriting image references in text when samples are merged into one conversation.

The template numbers images across the whole conversation ("Image 1", "Image 2", ...), so when a
sample moves into a blend its text must follow: explicit numbers ("image 1", "Images 1 and 2")
are mapped to the merged numbering, and a single-image question that says "the image" (or says
nothing about which image) is pointed at its image by number, e.g. "What colour is the star?"
-> "In image 2, what colour is the star?".
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from visualchat.messages import Part, TextPart

_NOUN = r"(?:image|picture|photo)"
# "images 1 and 3", "Images 1, 2 and 4": the number list of a plural noun.
_PLURAL = rf"(?P<plural>\b{_NOUN}s\s+)(?P<numbers>\d+(?:\s*(?:,|\band\b|\bor\b|&)\s*\d+)*)\b"
# "image 2", "Picture 1": a singular noun and one number.
_SINGLE = rf"(?P<single>\b{_NOUN}\s+)(?P<number>\d+)\b"
_EXPLICIT = re.compile(f"{_PLURAL}|{_SINGLE}", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")
# "the image", "This picture": a single-image sample's own image (not followed by a number).
_DEICTIC = re.compile(rf"\b(?P<det>the|this)\s+{_NOUN}\b(?!\s*\d)", re.IGNORECASE)


def renumber(text: str, mapping: Mapping[int, int]) -> str:
    """``text`` with explicit image numbers found in ``mapping`` replaced (others left)."""
    if not mapping:
        return text

    def new_number(match: re.Match[str]) -> str:
        number = int(match.group())
        return str(mapping.get(number, number))

    def replace(match: re.Match[str]) -> str:
        if match.group("plural"):
            return match.group("plural") + _DIGITS.sub(new_number, match.group("numbers"))
        return match.group("single") + str(mapping.get(int(match["number"]), match["number"]))

    return _EXPLICIT.sub(replace, text)


def refers_to(text: str, number: int) -> bool:
    """Whether ``text`` names image ``number`` explicitly."""
    for match in _EXPLICIT.finditer(text):
        digits = match.group("numbers") or match.group("number")
        if number in {int(d) for d in _DIGITS.findall(digits)}:
            return True
    return False


def refer_to_image(text: str, number: int) -> str:
    """A single-image question pointed at image ``number``: "the image" / "this picture" become
    "image {number}"; with no such phrase, "In image {number}, " is put in front."""
    if refers_to(text, number):
        return text
    replaced, num_replaced = _DEICTIC.subn(lambda m: _image_word(m, number), text)
    if num_replaced:
        return replaced
    return f"In image {number}, {_lower_first(text)}"


def refer_parts_to_image(parts: list[Part], number: int) -> list[Part]:
    """:func:`refer_to_image` over a user turn's parts: deictic phrases are replaced in every
    text part; when none names the image, the first text part gets the "In image k, " prefix."""
    texts = [part.text for part in parts if isinstance(part, TextPart)]
    if not texts or any(refers_to(text, number) for text in texts):
        return parts
    replaced = [_DEICTIC.sub(lambda m: _image_word(m, number), text) for text in texts]
    if replaced == texts:
        replaced[0] = refer_to_image(texts[0], number)
    new_texts = iter(replaced)
    return [TextPart(next(new_texts)) if isinstance(part, TextPart) else part for part in parts]


def _image_word(match: re.Match[str], number: int) -> str:
    return ("Image" if match.group("det")[0].isupper() else "image") + f" {number}"


def _lower_first(text: str) -> str:
    """Lower-case the first letter, unless the first word is "I" or an acronym ("CAT")."""
    first_word = text.split(maxsplit=1)[0] if text.strip() else ""
    if len(first_word) < 2 or not first_word[1:2].islower():
        return text
    return text[0].lower() + text[1:]
