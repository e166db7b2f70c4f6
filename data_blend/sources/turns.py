"""LLaVA-style ``conversations`` (``{"from": "human"|"gpt", "value": ...}`` with ``<image>``
markers) -> :class:`Round` s. Shared by the LLaVA, dialogue and column adapters.

Placement rule: each ``<image>`` marker in a human turn takes the next image, in order; images
left over after the markers go, in order, to the start of the first human turn (so a record with
no marker at all gets its image before the first question, as LLaVA does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from data_blend.sample import BadRecord, Round
from visualchat.images import ImageSource
from visualchat.messages import ImagePart, Part, TextPart

IMAGE_MARKER = "<image>"
_MARKER_SPLIT = re.compile(re.escape(IMAGE_MARKER))
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


def parse_conversations(conversations: Any, images: Sequence[ImageSource]) -> list[Round]:
    """Rounds of a record; raises :class:`BadRecord` when the turns cannot be used."""
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("missing_field", "'conversations' must be a non-empty list")
    turns = [_turn(i, turn) for i, turn in enumerate(conversations)]
    if len(turns) % 2:
        raise BadRecord("non_alternating_turns", f"{len(turns)} turns; the last needs a reply")
    for i, (role, _) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise BadRecord("non_alternating_turns", f"turn {i} is {role!r}, expected {expected!r}")
    num_markers = sum(text.count(IMAGE_MARKER) for role, text in turns if role == "human")
    if any(IMAGE_MARKER in text for role, text in turns if role == "gpt"):
        raise BadRecord("image_marker_in_reply", "an <image> marker in a gpt turn")
    if num_markers > len(images):
        raise BadRecord(
            "too_many_image_markers", f"{num_markers} <image> markers for {len(images)} image(s)"
        )
    queue = list(images)
    leftover = queue[num_markers:]
    rounds = []
    for i in range(0, len(turns), 2):
        user = _split_markers(turns[i][1], queue)
        if i == 0:
            user = [ImagePart(image) for image in leftover] + user
        answer = turns[i + 1][1].strip()
        if not user:
            raise BadRecord("empty_turn", f"human turn {i} has no text and no image")
        if not answer:
            raise BadRecord("empty_turn", f"gpt turn {i + 1} is empty")
        rounds.append(Round(user, answer))
    return rounds


def _turn(index: int, turn: Any) -> tuple[str, str]:
    if not isinstance(turn, Mapping):
        raise BadRecord("missing_field", f"conversations[{index}] is not an object")
    role, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if not isinstance(value, str):
        raise BadRecord("missing_field", f"conversations[{index}] has no string 'value'")
    if role in _USER_ROLES:
        return "human", value
    if role in _ASSISTANT_ROLES:
        return "gpt", value
    raise BadRecord("bad_role", f"conversations[{index}] 'from' is {role!r}")


def _split_markers(text: str, queue: list[ImageSource]) -> list[Part]:
    """Text and images of a human turn, each marker replaced by the next queued image."""
    parts: list[Part] = []
    for j, piece in enumerate(_MARKER_SPLIT.split(text)):
        if j:
            parts.append(ImagePart(queue.pop(0)))
        piece = piece.strip()
        if piece:
            parts.append(TextPart(piece))
    return parts
