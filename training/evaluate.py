"""Exact-match scoring of held-out conversations, per question family and family group.

Every assistant turn of a held-out record is one question: the model answers the conversation
up to that turn (earlier turns carry the gold replies, as in training) and the answer is right
when it equals the record's reply after `normalize_answer`. Answers come from anything with
`generate(conversation, params) -> object with .text` -- `visualchat.api.VisualChat` (the
reference decoder) today, the serving engine later -- so the scorer never touches tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from visualchat.messages import Conversation
from visualchat.processor import ContextLengthError
from visualchat.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Question families of the blended data, grouped the way results are reported.
FAMILY_GROUPS: dict[str, tuple[str, ...]] = {
    "attribute": ("color", "shape", "position"),  # single-image attributes
    "count": ("count",),
    "word": ("word",),
    "cross_image": ("cross_which", "cross_count", "cross_common"),
}
OTHER_GROUP = "other"  # families outside FAMILY_GROUPS
UNKNOWN_FAMILY = "unknown"  # a turn the record gives no family for
_TRAILING = re.compile(r"[\s.,!?;:]+$")


class Answerer(Protocol):
    def generate(self, conversation: Conversation, params: SamplingParams) -> Any: ...


def normalize_answer(text: str) -> str:
    """Lowercase, whitespace collapsed, trailing punctuation dropped: " Image  2." -> "image 2"."""
    return _TRAILING.sub("", " ".join(text.split()).lower())


def is_exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def family_group(family: str) -> str:
    for group, families in FAMILY_GROUPS.items():
        if family in families:
            return group
    return OTHER_GROUP


@dataclass
class TurnResult:
    record_id: str
    turn: int  # 0-based assistant turn within the record
    family: str
    prediction: str
    gold: str

    @property
    def is_correct(self) -> bool:
        return is_exact_match(self.prediction, self.gold)


@dataclass
class Score:
    num_correct: int = 0
    num_total: int = 0

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_total if self.num_total else 0.0

    def add(self, is_correct: bool) -> None:
        self.num_correct += int(is_correct)
        self.num_total += 1

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval of the accuracy (95% for z = 1.96). Why: a family has 50
        questions here, so one question is 2 points; the interval says which differences
        between checkpoints a single evaluation can show at all."""
        n = self.num_total
        if n == 0:
            return 0.0, 1.0
        p = self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval()
        return {
            "correct": self.num_correct,
            "total": self.num_total,
            "accuracy": self.accuracy,
            "ci95": [round(low, 4), round(high, 4)],
        }


@dataclass
class EvalReport:
    results: list[TurnResult] = field(default_factory=list)

    def by_family(self) -> dict[str, Score]:
        scores: dict[str, Score] = {}
        for result in self.results:
            scores.setdefault(result.family, Score()).add(result.is_correct)
        return dict(sorted(scores.items()))

    def by_group(self) -> dict[str, Score]:
        """Groups in FAMILY_GROUPS order (then "other"); groups with no question are left out."""
        scores: dict[str, Score] = {}
        for result in self.results:
            scores.setdefault(family_group(result.family), Score()).add(result.is_correct)
        order = [*FAMILY_GROUPS, OTHER_GROUP]
        return {group: scores[group] for group in order if group in scores}

    def overall(self) -> Score:
        score = Score()
        for result in self.results:
            score.add(result.is_correct)
        return score

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall().to_dict(),
            "groups": {name: s.to_dict() for name, s in self.by_group().items()},
            "families": {name: s.to_dict() for name, s in self.by_family().items()},
            "results": [
                {
                    "id": r.record_id,
                    "turn": r.turn,
                    "family": r.family,
                    "prediction": r.prediction,
                    "gold": r.gold,
                    "correct": r.is_correct,
                }
                for r in self.results
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def table(self) -> str:
        """Plain-text table: each group's families, the group total, then the overall line."""
        rows = [("group", "family", "correct", "total", "accuracy", "95% interval")]
        families = self.by_family()
        for group, score in self.by_group().items():
            for name, family_score in families.items():
                if family_group(name) == group:
                    rows.append((group, name, *_cells(family_score)))
            rows.append((group, "(all)", *_cells(score)))
        rows.append(("overall", "", *_cells(self.overall())))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = []
        for row in rows:
            left = [cell.ljust(w) for cell, w in zip(row[:2], widths[:2], strict=True)]
            right = [cell.rjust(w) for cell, w in zip(row[2:], widths[2:], strict=True)]
            lines.append("  ".join(left + right).rstrip())
        return "\n".join(lines)


def _cells(score: Score) -> tuple[str, str, str, str]:
    low, high = score.interval()
    return (
        str(score.num_correct),
        str(score.num_total),
        f"{100 * score.accuracy:.1f}%",
        f"{100 * low:.1f}-{100 * high:.1f}",
    )


@dataclass(frozen=True)
class PairedComparison:
    """Two evaluations of the same questions, matched by (record id, turn): the questions only
    one of them got right, and the exact two-sided McNemar p-value of that split (a binomial
    test of the discordant questions at 1/2). Paired, because both answered the same
    questions: far more sensitive than comparing two accuracies with their intervals."""

    num_shared: int  # questions in both reports
    new_only: int  # right in the new report, wrong in the old
    old_only: int  # right in the old report, wrong in the new
    p_value: float

    def summary(self) -> str:
        return (
            f"against the old report, on {self.num_shared} shared questions: "
            f"{self.new_only} now right that were wrong, {self.old_only} now wrong that were "
            f"right (net {self.new_only - self.old_only:+d}; exact McNemar p = {self.p_value:.3g})"
        )


def report_outcomes(report: Any) -> dict[tuple[str, int], bool]:
    """(record id, turn) -> answered right, from an `EvalReport.to_dict()` result (e.g. a
    `--json` file); ValueError when `report` is not one."""
    results = report.get("results") if isinstance(report, Mapping) else None
    if not isinstance(results, list):
        raise ValueError("it has no 'results' list")
    try:
        return {(str(r["id"]), int(r["turn"])): bool(r["correct"]) for r in results}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"a result lacks a valid id, turn or correct ({error!r})") from None


def compare_reports(new: Mapping[str, Any], old: Mapping[str, Any]) -> PairedComparison:
    """Paired comparison of two `EvalReport.to_dict()` results (e.g. two `--json` files)."""
    new_outcomes, old_outcomes = report_outcomes(new), report_outcomes(old)
    shared = new_outcomes.keys() & old_outcomes.keys()
    if not shared:
        raise ValueError("the two reports share no question (record id and turn)")
    new_only = sum(new_outcomes[k] and not old_outcomes[k] for k in shared)
    old_only = sum(old_outcomes[k] and not new_outcomes[k] for k in shared)
    return PairedComparison(len(shared), new_only, old_only, _mcnemar_exact(new_only, old_only))


def _mcnemar_exact(a: int, b: int) -> float:
    """Two-sided exact binomial p-value of a of a + b discordant pairs at probability 1/2."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def evaluation_turns(
    record: Mapping[str, Any],
) -> Iterable[tuple[int, str, Conversation, str]]:
    """(turn, family, conversation before the reply, gold reply) per assistant turn."""
    conversation = Conversation.from_hf(record["messages"], record.get("images") or [])
    families = list(record.get("families") or [])
    turn = 0
    for index, message in enumerate(conversation.messages):
        if message.role != "assistant":
            continue
        # data_blend writes "" for a turn of unknown family.
        family = (families[turn] if turn < len(families) else "") or UNKNOWN_FAMILY
        yield turn, family, Conversation(conversation.messages[:index]), message.text
        turn += 1


def evaluate_records(
    chat: Answerer,
    records: Iterable[Mapping[str, Any]],
    max_tokens: int = 32,
    progress: bool = False,
    batch_size: int = 1,
) -> EvalReport:
    """Greedy answers to every assistant turn of `records`, scored by exact match.

    Every turn is an independent prompt (earlier replies are the gold ones), so with
    batch_size > 1 and an answerer that has `generate_batch` (the serving engine) the turns go
    in batches that the engine decodes together; the answers are the same, only faster.
    """
    from tqdm.auto import tqdm

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    report = EvalReport()
    batched = batch_size > 1 and hasattr(chat, "generate_batch")
    pending: list[tuple[str, int, str, Conversation, str]] = []

    def flush() -> None:
        outputs = chat.generate_batch([p[3] for p in pending], params)
        for (record_id, turn, family, _, gold), out in zip(pending, outputs, strict=True):
            report.results.append(TurnResult(record_id, turn, family, out.text, gold))
        pending.clear()

    for index, record in enumerate(tqdm(records, desc="eval", disable=not progress)):
        record_id = str(record.get("id", index))
        for turn, family, conversation, gold in evaluation_turns(record):
            if batched:
                pending.append((record_id, turn, family, conversation, gold))
                if len(pending) >= batch_size:
                    flush()
                continue
            try:
                prediction = chat.generate(conversation, params).text
            except ContextLengthError as err:
                logger.warning("record %s turn %d does not fit: %s", record_id, turn, err)
                prediction = ""
            report.results.append(TurnResult(record_id, turn, family, prediction, gold))
    if pending:
        flush()
    return report


def evaluate_checkpoint(
    model_or_path: Answerer | tuple[Any, Any] | str | os.PathLike,
    data_path: str | os.PathLike,
    max_samples: int | None = None,
    max_tokens: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = False,
    batch_size: int = 1,
) -> EvalReport:
    """Score a model on a held-out blended dataset folder.

    model_or_path: a VisualChat (or any Answerer, e.g. the engine), a (VisualChatModel,
    tokenizer) pair, or a checkpoint folder (full or delta). max_samples: records scored, from
    the start of the dataset (None: all). batch_size > 1 with a path loads the checkpoint into
    the serving engine and decodes that many turns together."""
    from training.data import open_blended
    from visualchat.api import VisualChat

    if isinstance(model_or_path, str | os.PathLike):
        if batch_size > 1:
            from serving.engine.engine import Engine

            chat: Answerer = Engine.from_pretrained(model_or_path, device=device, dtype=dtype)
        else:
            chat = VisualChat.from_pretrained(model_or_path, device=device, dtype=dtype)
    elif isinstance(model_or_path, tuple):
        chat = VisualChat(*model_or_path)
    else:
        chat = model_or_path
    dataset = open_blended(data_path)
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    return evaluate_records(
        chat,
        (dataset[i] for i in range(count)),
        max_tokens=max_tokens,
        progress=progress,
        batch_size=batch_size,
    )
