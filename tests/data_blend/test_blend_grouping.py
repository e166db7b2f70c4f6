"""Blending: grouping and renumbering, image cap, truncation, ratios, determinism."""

from __future__ import annotations

import pytest
from blend_factories import BLUE, GREEN, RED, ListSource, make_sample, texts, words_length

import data_blend.blend as blend_module
from data_blend.blend import BlendConfig, Blender, approx_num_tokens, merge
from data_blend.sample import Round, Sample
from visualchat.messages import Conversation, ImagePart, TextPart


def singles(name: str, count: int) -> ListSource:
    return ListSource(name, [make_sample(str(i), name) for i in range(count)])


def blend(sources, weights=None, length_fn=None, **config) -> tuple[list[Sample], Blender]:
    config.setdefault("num_samples", 20)
    blender = Blender(
        sources, weights or [1.0] * len(sources), BlendConfig(**config), length_fn=length_fn
    )
    return list(blender), blender


# --- merge / renumbering --------------------------------------------------------------------


def test_merge_renumbers_questions_and_keeps_image_order():
    first = make_sample("a", "x", ["What is in the image?"], ["A red square."], colours=[RED])
    second = make_sample(
        "b", "y", ["Describe image 1.", "Is it big?"], ["Image 1 is green.", "No."], colours=[GREEN]
    )
    third = make_sample("c", "x", ["How many cats?"], ["2"], colours=[BLUE], families=["count"])
    merged = merge([first, second, third], "000007")

    assert merged.sample_id == "000007:x/a+y/b+x/c"
    assert merged.source == "x+y"
    assert texts(merged) == [
        ("What is in image 1?", "A red square."),
        ("Describe image 2.", "Image 2 is green."),
        ("In image 2, is it big?", "No."),
        ("In image 3, how many cats?", "2"),
    ]
    assert merged.images == [*first.images, *second.images, *third.images]
    assert [im.getpixel((0, 0)) for im in merged.images] == [RED, GREEN, BLUE]
    assert merged.scenes == ["scene-a-0", "scene-b-0", "scene-c-0"]
    assert merged.families == ["", "", "", "count"]
    # Images stay at the start of their own user turn.
    assert [type(p).__name__ for p in merged.rounds[1].user] == ["ImagePart", "TextPart"]


def test_merge_of_one_sample_leaves_its_text_alone():
    sample = make_sample("a", questions=["What is in the image?"])
    assert texts(merge([sample])) == [("What is in the image?", "answer 0")]


def test_multi_image_sample_references_move_with_the_sample():
    single = make_sample("s", questions=["What colour?"])
    multi = make_sample("m", questions=["Compare image 1 and image 2."], num_images=2)
    merged = merge([single, multi])
    assert texts(merged) == [
        ("In image 1, what colour?", "answer 0"),
        ("Compare image 2 and image 3.", "answer 0"),
    ]


# --- grouping -------------------------------------------------------------------------------


def test_groups_have_one_to_max_group_single_image_samples():
    samples, blender = blend([singles("s", 50)], num_samples=40, max_group=3, seed=1)
    sizes = [s.num_images for s in samples]
    assert set(sizes) == {1, 2, 3}
    assert blender.stats.num_images == sum(sizes)
    for sample in samples:
        questions = [question for question, _ in texts(sample)]
        if sample.num_images == 1:
            assert questions == ["What is in the image?"]
        else:
            expected = [f"What is in image {k}?" for k in range(1, sample.num_images + 1)]
            assert questions == expected


def test_image_cap_limits_groups():
    samples, _ = blend([singles("s", 50)], num_samples=30, max_group=4, max_images=2)
    assert {s.num_images for s in samples} == {1, 2}


def test_multi_image_samples_are_never_merged():
    mixed = ListSource(
        "mix",
        [make_sample("one", "mix"), make_sample("two", "mix", num_images=3)],
    )
    samples, _ = blend([mixed], num_samples=40, max_group=3, max_images=8, seed=3)
    with_multi = [s for s in samples if "mix/two" in s.sample_id]
    assert with_multi
    assert all(s.sample_id.split(":")[1] == "mix/two" for s in with_multi)
    assert all(s.num_images == 3 for s in with_multi)


# --- truncation -----------------------------------------------------------------------------


def three_rounds() -> Sample:
    # words_length: 10 per image; question + answer words per round: 4, 4, 4
    return make_sample(
        "t", questions=["q one two", "q three four", "q five six"], answers=["a", "b", "c"]
    )


@pytest.mark.parametrize(("max_length", "num_rounds"), [(22, 3), (21, 2), (18, 2), (17, 1)])
def test_truncation_drops_whole_trailing_rounds(max_length, num_rounds):
    samples, blender = blend(
        [ListSource("s", [three_rounds()])],
        length_fn=words_length,
        num_samples=2,
        max_group=1,
        max_length=max_length,
    )
    assert [len(s.rounds) for s in samples] == [num_rounds, num_rounds]
    assert all(words_length(s.to_conversation()) <= max_length for s in samples)
    assert texts(samples[0]) == texts(three_rounds())[:num_rounds]
    assert blender.stats.num_truncated == (2 if num_rounds < 3 else 0)


def test_truncation_never_separates_a_user_turn_from_its_images():
    rounds = [
        Round([ImagePart(make_sample("x").images[0]), TextPart("q")], "a"),
        Round([TextPart("q"), ImagePart(make_sample("y").images[0])], "b"),
    ]
    sample = Sample("two", "s", rounds, ["first", "second"])
    # Round 1 is 12 long with its image; round 2's text (2 words) fits the budget of 20, its
    # image (10) does not.
    samples, _ = blend(
        [ListSource("s", [sample])], length_fn=words_length, num_samples=1, max_length=20
    )
    (result,) = samples
    assert len(result.rounds) == 1 and result.rounds[0].num_images == 1
    assert result.scenes == ["first"]


def test_samples_whose_first_round_does_not_fit_are_dropped_and_counted():
    long = make_sample("long", "s", ["word " * 50])
    short = make_sample("short", "s", ["Hi?"])
    samples, blender = blend(
        [ListSource("s", [long, short])],
        length_fn=words_length,
        num_samples=10,
        max_group=1,
        max_length=20,
        seed=5,
    )
    assert [s.sample_id for s in samples] == [f"{i:06d}:s/short" for i in range(10)]
    assert all(len(s.rounds) == 1 for s in samples)
    assert blender.stats.dropped["too_long"] > 0
    assert blender.stats.source_counts == {"s": 10}


def test_too_many_images_dropped_and_hopeless_limits_raise(monkeypatch):
    wide = make_sample("wide", "s", num_images=5)
    ok = make_sample("ok", "s", num_images=2)
    samples, blender = blend(
        [ListSource("s", [wide, ok])], num_samples=6, max_images=4, max_group=1, seed=2
    )
    assert {s.sample_id.split(":")[1] for s in samples} == {"s/ok"}
    assert set(blender.stats.dropped) == {"too_many_images"}

    monkeypatch.setattr(blend_module, "MAX_FAILED_DRAWS", 5)
    with pytest.raises(RuntimeError, match="5 conversations in a row did not fit max_length=3"):
        blend([ListSource("s", [ok])], length_fn=words_length, num_samples=1, max_length=3)


def test_max_length_needs_a_length_fn():
    with pytest.raises(ValueError, match="max_length is set but no length_fn"):
        Blender([singles("s", 2)], [1.0], BlendConfig(num_samples=1, max_length=10))


def test_approx_num_tokens():
    conversation = Conversation()
    conversation.add_user("What colour is the star?", images=[make_sample("a").images[0]])
    conversation.add_assistant("red")
    # 6 words/punctuation + 4, 1 word + 4, one image of 64
    assert approx_num_tokens(conversation) == 10 + 5 + 64
    assert approx_num_tokens(conversation, num_image_tokens=8) == 23


# --- ratios and determinism -----------------------------------------------------------------


def test_random_sampling_realises_the_weights():
    sources = [singles("a", 20), singles("b", 20)]
    _, blender = blend(sources, [3.0, 1.0], num_samples=800, max_group=1, seed=0)
    counts = blender.stats.source_counts
    assert counts["a"] + counts["b"] == 800
    assert abs(counts["a"] / 800 - 0.75) < 0.04
    assert blender.ratios == [0.75, 0.25]


def test_sequential_sampling_walks_sources_in_order_with_exact_ratios():
    sources = [singles("a", 3), singles("b", 10)]
    samples, blender = blend(sources, [2.0, 1.0], num_samples=9, max_group=1, sampling="sequential")
    assert [s.sample_id.split(":")[1] for s in samples] == [
        "a/0", "b/0", "a/1", "a/2", "b/1", "a/0", "a/1", "b/2", "a/2",
    ]  # fmt: skip
    assert blender.stats.source_counts == {"a": 6, "b": 3}


def test_same_seed_same_blend_other_seed_other_blend():
    def run(seed):
        samples, _ = blend([singles("a", 30), singles("b", 30)], [1.0, 2.0], seed=seed)
        return [(s.sample_id, s.to_conversation().to_hf()[0]) for s in samples]

    assert run(11) == run(11)
    assert [i for i, _ in run(11)] != [i for i, _ in run(12)]


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    bad = Sample("s/bad", "s", [Round([ImagePart(broken), TextPart("q")], "a")])
    good = make_sample("good", "s")
    source = ListSource("s", [bad, good])
    samples, _ = blend([source], num_samples=5, max_group=1, seed=4)
    assert all(s.sample_id.endswith("s/good") for s in samples)
    assert source.skips.counts["unreadable_image"] > 0
    assert set(source.skips.counts) == {"unreadable_image"}


def test_empty_source_and_bad_weights_are_refused():
    with pytest.raises(ValueError, match="source 'e' has no usable samples"):
        Blender([ListSource("e", [])], [1.0], BlendConfig(num_samples=1))
    with pytest.raises(ValueError, match="source weights must be positive"):
        Blender([singles("s", 1)], [0.0], BlendConfig(num_samples=1))
    with pytest.raises(ValueError, match="max_group must be a positive int, got 0"):
        BlendConfig(num_samples=1, max_group=0)
