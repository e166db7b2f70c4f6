"""Blending: samples drawn from weighted sources, grouped into multi-image conversations,
renumbered and truncated to a token budget.

Design note. As in DeepSpeed-VisualChat, single-image samples are merged at random, 1 to
``max_group`` at a time, into one multi-round conversation, so that the model learns to tell
images apart by number. The template numbers images across the conversation, so each merged
sample's text is rewritten to the merged numbering (:mod:`data_blend.renumber`): explicit
"image k" references move with the sample and a single-image question that says "the image" (or
nothing) names its image ("In image 2, what colour is the star?"). Native multi-image samples
(dialogues, cross-image questions) are never merged: their "these images" must keep meaning
their own images. Groups are formed from one stream of draws: a drawn sample that cannot join the
current group (multi-image, or over the image cap) starts the next one, so no draw is thrown
away and the realised source mix follows the weights. Truncation then drops whole trailing
rounds (user turn + reply) until the conversation fits ``max_length`` tokens (as measured by the
injected ``length_fn``) and ``max_images``: a user turn always keeps its images and every kept
sample ends with an answer; a conversation whose first round alone does not fit is dropped and
counted. Everything is drawn from one ``random.Random(seed)``, so a recipe and seed give the
same blend every time.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from data_blend.renumber import refer_parts_to_image, renumber
from data_blend.sample import Round, Sample, SampleSource
from visualchat.images import ImageError, ImageLimits, describe_source, load_image
from visualchat.messages import Conversation, ImagePart, Part, TextPart

logger = logging.getLogger(__name__)

LengthFn = Callable[[Conversation], int]  # tokens of a conversation, images included
Sampling = Literal["random", "sequential"]

# Consecutive draws that may fail (unreadable image, too long) before the blend gives up.
MAX_FAILED_DRAWS = 1000
APPROX_IMAGE_TOKENS = 64  # image tokens assumed by approx_num_tokens
_LIMITS = ImageLimits(max_images=1_000_000)
_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class BlendConfig:
    num_samples: int  # blended conversations to produce
    seed: int = 0
    max_images: int = 8  # images per blended conversation
    max_group: int = 3  # single-image samples merged into one conversation, at most
    max_length: int | None = None  # tokens per conversation (length_fn); None: no limit
    sampling: Sampling = "random"  # random: with replacement; sequential: in order, cycling

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_images", "max_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be positive or None, got {self.max_length}")
        if self.sampling not in ("random", "sequential"):
            raise ValueError(f"sampling must be 'random' or 'sequential', got {self.sampling!r}")


@dataclass
class BlendStats:
    num_samples: int = 0  # blended conversations produced
    num_images: int = 0
    num_rounds: int = 0
    num_truncated: int = 0  # conversations that lost trailing rounds
    source_counts: Counter[str] = field(default_factory=Counter)  # source samples used, by source
    dropped: Counter[str] = field(default_factory=Counter)  # conversations dropped, by reason


def approx_num_tokens(
    conversation: Conversation, num_image_tokens: int = APPROX_IMAGE_TOKENS
) -> int:
    """A tokenizer-free estimate: words and punctuation (or a quarter of the characters, if
    more), 4 per message for the chat template, ``num_image_tokens`` per image."""
    total = 0
    for message in conversation.messages:
        text = message.text
        total += 4 + max(len(_WORDS.findall(text)), len(text) // 4)
    return total + num_image_tokens * conversation.num_images


class Blender:
    def __init__(
        self,
        sources: Sequence[SampleSource],
        weights: Sequence[float],  # one per source, normalised here
        config: BlendConfig,
        length_fn: LengthFn | None = None,  # required when config.max_length is set
    ) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"need one weight per source, got {len(weights)} for {len(sources)}")
        if any(w <= 0 for w in weights):
            raise ValueError(f"source weights must be positive, got {list(weights)}")
        for source in sources:
            if len(source) == 0:
                raise ValueError(
                    f"source {source.name!r} has no usable samples "
                    f"(skipped: {source.skips.as_dict() or 'none'})"
                )
        if config.max_length is not None and length_fn is None:
            raise ValueError("max_length is set but no length_fn was given to measure it")
        total = sum(weights)
        self.sources = list(sources)
        self.ratios = [w / total for w in weights]
        self.config = config
        self.length_fn = length_fn
        self.stats = BlendStats()
        self._rng = random.Random(config.seed)
        self._num_drawn = [0] * len(sources)  # sequential: draws per source so far

    def __iter__(self) -> Iterator[Sample]:
        """Blended conversations, ``config.num_samples`` of them, images loaded (PIL)."""
        draws = self._draws()
        pending: Sample | None = None
        num_failed = 0
        while self.stats.num_samples < self.config.num_samples:
            group = [pending or next(draws)]
            pending = None
            size = self._rng.randint(1, self.config.max_group)
            while len(group) < size and group[0].num_images <= 1:
                candidate = next(draws)
                num_images = sum(s.num_images for s in group) + candidate.num_images
                if candidate.num_images > 1 or num_images > self.config.max_images:
                    pending = candidate
                    break
                group.append(candidate)
            blended = self._fit(merge(group, f"{self.stats.num_samples:06d}"), group)
            if blended is None:
                num_failed += 1
                if num_failed >= MAX_FAILED_DRAWS:
                    raise RuntimeError(
                        f"{num_failed} conversations in a row did not fit max_length="
                        f"{self.config.max_length} / max_images={self.config.max_images} "
                        f"(dropped: {dict(self.stats.dropped)}); raise the limits"
                    )
                continue
            num_failed = 0
            self.stats.num_samples += 1
            self.stats.num_images += blended.num_images
            self.stats.num_rounds += len(blended.rounds)
            yield blended

    # --- drawing ------------------------------------------------------------------------------

    def _draws(self) -> Iterator[Sample]:
        """Source samples with their images loaded; unreadable ones are skipped and counted."""
        num_failed = 0
        while True:
            position = self._pick_source()
            source = self.sources[position]
            sample = source[self._pick_index(position)]
            try:
                yield _load_images(sample)
                num_failed = 0
            except ImageError as exc:
                source.skips.skip("unreadable_image", sample.sample_id, str(exc))
                num_failed += 1
                if num_failed >= MAX_FAILED_DRAWS:
                    raise RuntimeError(
                        f"{num_failed} draws in a row had unreadable images; last: {exc}"
                    ) from exc

    def _pick_source(self) -> int:
        if self.config.sampling == "random":
            return self._rng.choices(range(len(self.sources)), self.ratios)[0]
        # Sequential: the source furthest behind its share goes next (smooth weighted
        # round-robin), so the realised mix tracks the weights exactly.
        total = sum(self._num_drawn) + 1
        deficits = [r * total - n for r, n in zip(self.ratios, self._num_drawn, strict=True)]
        return max(range(len(deficits)), key=deficits.__getitem__)

    def _pick_index(self, position: int) -> int:
        source = self.sources[position]
        if self.config.sampling == "random":
            return self._rng.randrange(len(source))
        count = self._num_drawn[position]
        self._num_drawn[position] += 1
        if count == len(source):
            logger.warning("%s: all %d samples used; starting over", source.name, len(source))
        return count % len(source)

    # --- truncation ---------------------------------------------------------------------------

    def _fit(self, blended: Sample, group: list[Sample]) -> Sample | None:
        """``blended`` cut to its longest prefix of whole rounds within the limits, or None."""
        rounds = blended.rounds
        num_rounds = len(rounds)
        if not self._fits(rounds):
            # Limits are monotone in the number of rounds: binary search the longest prefix.
            low, high = 0, num_rounds - 1  # fits(low) holds (empty), fits(high + 1) does not
            while low < high:
                middle = (low + high + 1) // 2
                if self._fits(rounds[:middle]):
                    low = middle
                else:
                    high = middle - 1
            num_rounds = low
        if num_rounds == 0:
            too_many = rounds[0].num_images > self.config.max_images
            reason = "too_many_images" if too_many else "too_long"
            self.stats.dropped[reason] += 1
            logger.debug("dropped %s (%s)", blended.sample_id, reason)
            return None
        kept = rounds[:num_rounds]
        # Which source samples survived: rounds were concatenated sample by sample.
        owners = itertools.chain.from_iterable([i] * len(s.rounds) for i, s in enumerate(group))
        for position in sorted(set(itertools.islice(owners, num_rounds))):
            self.stats.source_counts[group[position].source] += 1
        if num_rounds == len(rounds):
            return blended
        self.stats.num_truncated += 1
        num_images = sum(r.num_images for r in kept)
        return Sample(blended.sample_id, blended.source, kept, blended.scenes[:num_images])

    def _fits(self, rounds: list[Round]) -> bool:
        if sum(r.num_images for r in rounds) > self.config.max_images:
            return False
        if self.config.max_length is None or self.length_fn is None:
            return True
        conversation = Sample("", "", rounds, []).to_conversation()
        return self.length_fn(conversation) <= self.config.max_length


def merge(group: list[Sample], prefix: str = "") -> Sample:
    """One conversation of the group's samples, in order, images renumbered across it."""
    rounds: list[Round] = []
    first_number = 1
    is_merged = len(group) > 1
    for sample in group:
        mapping = {i + 1: first_number + i for i in range(sample.num_images)}
        for round_ in sample.rounds:
            user: list[Part] = [
                TextPart(renumber(part.text, mapping)) if isinstance(part, TextPart) else part
                for part in round_.user
            ]
            if is_merged and sample.num_images == 1:
                user = refer_parts_to_image(user, first_number)
            rounds.append(Round(user, renumber(round_.answer, mapping), round_.family))
        first_number += sample.num_images
    ids = "+".join(sample.sample_id for sample in group)
    return Sample(
        f"{prefix}:{ids}" if prefix else ids,
        "+".join(dict.fromkeys(sample.source for sample in group)),
        rounds,
        [scene for sample in group for scene in sample.scenes],
    )


def _load_images(sample: Sample) -> Sample:
    """The sample with every image decoded (RGB PIL); raises ImageError naming the file."""

    def load(part: Part) -> Part:
        if not isinstance(part, ImagePart):
            return part
        name = f"{sample.sample_id} ({part.name or describe_source(part.image)})"
        return ImagePart(load_image(part.image, _LIMITS, name=name), name=part.name)

    rounds = [Round([load(p) for p in r.user], r.answer, r.family) for r in sample.rounds]
    return Sample(sample.sample_id, sample.source, rounds, list(sample.scenes))
