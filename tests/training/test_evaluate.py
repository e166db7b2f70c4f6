"""Exact-match scorer: normalisation, family groups, exact numbers from a fake answerer, and a
real run through the VisualChat API on a saved checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from training_fixtures import make_blended_dataset, make_record

from tests.factories import make_model
from training.evaluate import (
    EvalReport,
    Score,
    TurnResult,
    compare_reports,
    evaluate_checkpoint,
    evaluate_records,
    evaluation_turns,
    family_group,
    is_exact_match,
    normalize_answer,
)
from visualchat.api import VisualChat
from visualchat.messages import Conversation
from visualchat.model import delta, loading
from visualchat.sampling import SamplingParams


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("red", "red"),
        ("  Red  ", "red"),
        ("Red.", "red"),
        ("red!!", "red"),
        ("red .", "red"),
        ("Image 2", "image 2"),
        ("image   2", "image 2"),
        ("IMAGE 2.", "image 2"),
        ("two\nimages", "two images"),
        ("3", "3"),
        ("yes, image 1", "yes, image 1"),  # inner punctuation stays
        ("?", ""),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match() -> None:
    assert is_exact_match("Image 2", "image 2.")
    assert is_exact_match(" Blue\n", "blue")
    assert not is_exact_match("image 2", "image 3")
    assert not is_exact_match("dark red", "red")
    assert not is_exact_match("2", "Image 2")


@pytest.mark.parametrize(
    ("family", "group"),
    [
        ("color", "attribute"),
        ("shape", "attribute"),
        ("position", "attribute"),
        ("count", "count"),
        ("word", "word"),
        ("cross_which", "cross_image"),
        ("cross_count", "cross_image"),
        ("cross_common", "cross_image"),
        ("caption", "other"),
    ],
)
def test_family_groups(family: str, group: str) -> None:
    assert family_group(family) == group


def test_evaluation_turns_give_the_conversation_up_to_each_reply() -> None:
    record = make_record(1, multi=True)  # two images; "Image 2", then "green"
    turns = list(evaluation_turns(record))
    assert [(t, f, gold) for t, f, _, gold in turns] == [
        (0, "cross_which", "Image 2"),
        (1, "color", "green"),
    ]
    first, second = turns[0][2], turns[1][2]
    assert [m.role for m in first.messages] == ["user"]
    assert [m.role for m in second.messages] == ["user", "assistant", "user"]
    assert second.messages[1].text == "Image 2"  # earlier turns carry the gold reply
    assert first.num_images == second.num_images == 2


@dataclass
class Reply:
    text: str


class FakeAnswerer:
    """Answers from a table keyed by the last user message; records what it was asked."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[Conversation] = []

    def generate(self, conversation: Conversation, params: SamplingParams) -> Reply:
        assert params.is_greedy
        self.asked.append(conversation)
        return Reply(self.answers.get(conversation.messages[-1].text, "no idea"))


def test_exact_numbers_per_family_group_and_overall(tmp_path) -> None:
    # Records 0-2 and 4-6: one image, gold red, green, blue, green, blue, red. Records 3 and 7:
    # two images (red + green, green + blue), a cross_which turn, then Image 1's colour.
    folder = make_blended_dataset(tmp_path, 8, multi_every=4)
    answers = {
        "What color is the image?": "Red.",  # right for records 0 and 6 only
        "Which image is green?": "Image 1",  # record 3: wrong (Image 2)
        "Which image is blue?": "image 2",  # record 7: right
        "What color is Image 1?": "GREEN",  # record 3 (red): wrong; record 7 (green): right
    }
    fake = FakeAnswerer(answers)
    report = evaluate_checkpoint(fake, folder)
    assert len(fake.asked) == 10  # 6 single-turn records + 2 records x 2 turns
    assert {name: (s.num_correct, s.num_total) for name, s in report.by_family().items()} == {
        "color": (3, 8),
        "cross_which": (1, 2),
    }
    assert {name: (s.num_correct, s.num_total) for name, s in report.by_group().items()} == {
        "attribute": (3, 8),
        "cross_image": (1, 2),
    }
    overall = report.overall()
    assert (overall.num_correct, overall.num_total, overall.accuracy) == (4, 10, 0.4)
    assert report.table() == "\n".join(
        [
            "group        family       correct  total  accuracy  95% interval",
            "attribute    color              3      8     37.5%     13.7-69.4",
            "attribute    (all)              3      8     37.5%     13.7-69.4",
            "cross_image  cross_which        1      2     50.0%      9.5-90.5",
            "cross_image  (all)              1      2     50.0%      9.5-90.5",
            "overall                         4     10     40.0%     16.8-68.7",
        ]
    )
    data = json.loads(report.to_json())
    assert data["overall"] == {
        "correct": 4,
        "total": 10,
        "accuracy": 0.4,
        "ci95": [0.1682, 0.6873],
    }
    assert data["groups"]["cross_image"]["ci95"] == [0.0945, 0.9055]
    assert data["results"][3] == {
        "id": "rec-3",
        "turn": 0,
        "family": "cross_which",
        "prediction": "Image 1",
        "gold": "Image 2",
        "correct": False,
    }
    assert data["results"][8]["id"] == "rec-7" and data["results"][8]["correct"] is True
    limited = evaluate_checkpoint(FakeAnswerer(answers), folder, max_samples=2)
    assert [(r.record_id, r.turn) for r in limited.results] == [("rec-0", 0), ("rec-1", 0)]


def test_groups_without_questions_are_left_out_and_unknown_families_are_other() -> None:
    report = EvalReport(
        [
            TurnResult("a", 0, "count", "3", "3"),
            TurnResult("a", 1, "word", "cat", "dog"),
            TurnResult("b", 0, "caption", "x", "x"),
        ]
    )
    assert list(report.by_group()) == ["count", "word", "other"]
    assert report.by_group()["other"].accuracy == 1.0
    assert report.table().splitlines()[-1].split()[:4] == ["overall", "2", "3", "66.7%"]
    assert EvalReport().overall().accuracy == 0.0
    # No family given for a turn, or "" (data_blend's "unknown"): family "unknown".
    records = [dict(make_record(0), families=[]), dict(make_record(1), families=[""])]
    results = evaluate_records(FakeAnswerer({}), records).results
    assert [(r.family, r.prediction, r.is_correct) for r in results] == [
        ("unknown", "no idea", False)
    ] * 2


def test_a_checkpoint_path_is_scored_through_the_visualchat_api(tmp_path, backbone_dir) -> None:
    model, _ = make_model(seed=4)
    backbone, _ = loading.load_backbone(backbone_dir)
    model.language_model = backbone
    delta.save_delta(model, tmp_path / "delta", base_backbone=str(backbone_dir))
    folder = make_blended_dataset(tmp_path, 4, multi_every=4)
    report = evaluate_checkpoint(tmp_path / "delta", folder, max_samples=4, max_tokens=3)
    assert [(r.record_id, r.turn) for r in report.results] == [
        ("rec-0", 0),
        ("rec-1", 0),
        ("rec-2", 0),
        ("rec-3", 0),
        ("rec-3", 1),
    ]
    chat = VisualChat.from_pretrained(tmp_path / "delta")
    params = SamplingParams(max_tokens=3)
    for result in report.results:
        record = make_record(int(result.record_id.split("-")[1]), multi=result.record_id == "rec-3")
        conversation = list(evaluation_turns(record))[result.turn][2]
        assert result.prediction == chat.generate(conversation, params).text


def test_batched_engine_eval_and_the_cli_give_the_reference_answers(
    tmp_path, backbone_dir, capsys
) -> None:
    # batch_size > 1 loads the checkpoint into the serving engine and decodes turns together;
    # greedy answers must be those of the one-at-a-time reference decoder.
    from visualchat.cli import main as cli_main

    model, _ = make_model(seed=5)
    backbone, _ = loading.load_backbone(backbone_dir)
    model.language_model = backbone
    delta.save_delta(model, tmp_path / "delta", base_backbone=str(backbone_dir))
    folder = make_blended_dataset(tmp_path, 5, multi_every=2)
    one = evaluate_checkpoint(tmp_path / "delta", folder, max_tokens=3)
    batched = evaluate_checkpoint(tmp_path / "delta", folder, max_tokens=3, batch_size=3)
    assert len(one.results) == len(batched.results) > 5
    assert [r.prediction for r in batched.results] == [r.prediction for r in one.results]
    out = tmp_path / "report.json"
    args = ["eval", str(tmp_path / "delta"), "--data", str(folder), "--max-tokens", "3"]
    assert cli_main([*args, "--batch-size", "4", "--json", str(out)]) == 0
    assert "overall" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [r["prediction"] for r in saved["results"]] == [r.prediction for r in one.results]
    assert cli_main(["eval", str(tmp_path / "missing"), "--data", str(folder)]) == 2
    # A paired comparison against the saved report: the same answers, nothing changed.
    capsys.readouterr()
    assert cli_main([*args, "--compare-to", str(out)]) == 0
    assert f"on {len(one.results)} shared questions: 0 now right" in capsys.readouterr().out
    # A report that is not one fails at once, before any question is asked.
    for text, message in (
        ('{"overall": 1}', "no 'results' list"),
        ('{"results": [{"id": "rec-0"}]}', "lacks a valid id, turn or correct"),
    ):
        (tmp_path / "bad.json").write_text(text)
        assert cli_main([*args, "--compare-to", str(tmp_path / "bad.json")]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "overall" not in captured.out  # nothing evaluated
    # A report of other questions: the evaluation is printed, the comparison refused.
    other = {"results": [{"id": "elsewhere", "turn": 0, "correct": True}]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert cli_main([*args, "--compare-to", str(tmp_path / "other.json")]) == 2
    captured = capsys.readouterr()
    assert "overall" in captured.out and "share no question" in captured.err


@pytest.mark.parametrize(
    ("correct", "total", "low", "high"),
    # Wilson score intervals at 95%: the published values for 0, 5 and 10 of 10 (0/10 as in
    # Newcombe 1998, Table I), and 358 of 400 (v10's result) as a regression value.
    [
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
        (358, 400, 0.8611, 0.9214),
    ],
)
def test_wilson_interval(correct: int, total: int, low: float, high: float) -> None:
    interval = Score(correct, total).interval()
    assert interval == pytest.approx((low, high), abs=1e-4)
    assert Score().interval() == (0.0, 1.0)


def _report(outcomes: dict[str, bool]) -> dict:
    results = [
        TurnResult(key, 0, "count", "1" if right else "2", "1") for key, right in outcomes.items()
    ]
    return EvalReport(results).to_dict()


def test_paired_comparison_counts_the_discordant_questions_and_tests_them_exactly() -> None:
    old = _report({"a": True, "b": False, "c": False, "d": True, "e": False, "gone": True})
    new = _report({"a": True, "b": True, "c": True, "d": False, "e": False, "extra": True})
    comparison = compare_reports(new, old)
    # Shared: a..e. b and c are new wins, d an old win; p = 2 * P(X <= 1), X ~ Bin(3, 1/2).
    assert (comparison.num_shared, comparison.new_only, comparison.old_only) == (5, 2, 1)
    assert comparison.p_value == pytest.approx(1.0)
    five_wins = _report({str(i): True for i in range(5)})
    five_losses = _report({str(i): False for i in range(5)})
    assert compare_reports(five_wins, five_losses).p_value == pytest.approx(2 / 32)
    nine_to_one = compare_reports(
        _report({str(i): i > 0 for i in range(10)}), _report({str(i): i == 0 for i in range(10)})
    )
    assert (nine_to_one.new_only, nine_to_one.old_only) == (9, 1)
    assert nine_to_one.p_value == pytest.approx(2 * 11 / 1024)
    assert "net +8" in nine_to_one.summary()
    with pytest.raises(ValueError, match="share no question"):
        compare_reports(_report({"x": True}), _report({"y": True}))
