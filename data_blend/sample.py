"""The unit every source yields and the blender consumes: a :class:`Sample` of question/answer
:class:`Round` s, plus the bookkeeping of bad records (:class:`SkipLog`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from visualchat.images import ImageSource
from visualchat.messages import Conversation, ImagePart, Message, Part, TextPart

logger = logging.getLogger(__name__)

# Bad records past this many per source are logged at DEBUG only, so that a dirty source does not
# flood the log; every one is still counted.
MAX_LOGGED_SKIPS = 20


@dataclass
class Round:
    """One user turn and the assistant's reply to it; the unit that truncation drops."""

    user: list[Part]  # text and image parts in reading order (images as raw sources)
    answer: str  # the assistant's reply
    family: str = ""  # question family ("color", "cross_which", ...); "" when unknown

    def __post_init__(self) -> None:
        if not self.user:
            raise ValueError("a round needs a non-empty user turn")
        if not isinstance(self.answer, str):
            raise TypeError(f"Round.answer must be a str, got {type(self.answer).__name__}")

    @property
    def num_images(self) -> int:
        return sum(isinstance(part, ImagePart) for part in self.user)


@dataclass
class Sample:
    """A conversation from one source, images inline in its user turns."""

    sample_id: str  # unique within its source ("{source}/{original id}" once blended)
    source: str  # the source's name in the recipe; "a+b" for a blend of two sources
    rounds: list[Round]  # at least one
    scenes: list[str] = field(default_factory=list)  # one JSON per image, "" if not synthetic

    def __post_init__(self) -> None:
        if not self.rounds:
            raise ValueError(f"sample {self.sample_id!r} has no rounds")
        if not self.scenes:
            self.scenes = [""] * self.num_images
        if len(self.scenes) != self.num_images:
            raise ValueError(
                f"sample {self.sample_id!r}: {len(self.scenes)} scenes for {self.num_images} images"
            )

    @property
    def num_images(self) -> int:
        return sum(round_.num_images for round_ in self.rounds)

    @property
    def images(self) -> list[ImageSource]:
        return [p.image for r in self.rounds for p in r.user if isinstance(p, ImagePart)]

    @property
    def families(self) -> list[str]:
        return [round_.family for round_ in self.rounds]

    def to_conversation(self) -> Conversation:
        messages: list[Message] = []
        for round_ in self.rounds:
            messages.append(Message("user", list(round_.user)))
            messages.append(Message("assistant", [TextPart(round_.answer)]))
        return Conversation(messages)


class SampleSource(Protocol):
    """What the blender draws from: an indexable, sized collection of valid samples."""

    name: str  # the source's name in the recipe
    skips: SkipLog  # bad records met while reading the source

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def __iter__(self) -> Iterator[Sample]: ...


class BadRecord(ValueError):
    """A record that cannot become a sample; ``reason`` is the short key it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # snake_case key, e.g. "missing_image"
        self.detail = detail  # what exactly was wrong, for the log


class SkipLog:
    """Counts bad records by reason and logs each one (the first few at WARNING)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        level = logging.WARNING if self.total <= MAX_LOGGED_SKIPS else logging.DEBUG
        logger.log(level, "%s: skipped %s (%s%s)", self.source, where, reason, _colon(detail))

    def skip_bad(self, error: BadRecord, where: str) -> None:
        self.skip(error.reason, where, error.detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def _colon(detail: str) -> str:
    return f": {detail}" if detail else ""
