"""Projector alignment: targets are bags of word embeddings at object centres and the embedding
mean elsewhere; training the projector alone moves it towards them and touches nothing else."""

from __future__ import annotations

import torch
from factories import make_model

from data_blend.sources.scenes import Group, Scene
from training.projector_alignment import AlignConfig, WordVectors, align_projector, cell_targets


def test_targets_are_word_bags_at_object_centres_and_the_mean_elsewhere() -> None:
    model, tokenizer = make_model(seed=0)
    words = WordVectors(model.language_model.get_input_embeddings().weight, tokenizer)
    star = Group("red", "star", "small", "left", ((10, 40), (12, 60)))
    circle = Group("blue", "circle", "large", "right", ((80, 50),))
    scene = Scene(96, (250, 250, 250), (star, circle), "CAT", (40, 5, 70, 25))
    targets = cell_targets(scene, side=4, words=words)  # 24 px cells
    assert targets.shape == (16, words.mean.numel())
    red_star_left = (
        words.vectors["red"] + words.vectors["star"] + words.vectors["left"] + words.vectors["2"]
    )
    blue_circle = (
        words.vectors["blue"]
        + words.vectors["circle"]
        + words.vectors["right"]
        + words.vectors["1"]
    )
    expected = words.mean.expand(16, -1).clone()
    expected[1 * 4 + 0] += red_star_left  # (10, 40): row 1, column 0
    expected[2 * 4 + 0] += red_star_left  # (12, 60): row 2, column 0
    expected[2 * 4 + 3] += blue_circle  # (80, 50): row 2, column 3
    expected[0 * 4 + 2] += words.vectors["CAT"]  # word centre (55, 15)
    torch.testing.assert_close(targets, expected)


def test_a_group_counts_once_per_cell_and_its_size_is_in_the_bag() -> None:
    model, tokenizer = make_model(seed=0)
    words = WordVectors(model.language_model.get_input_embeddings().weight, tokenizer)
    # Two in cell (0, 1), the third in cell (0, 2): the group's size is 3 in both cells.
    trio = Group("green", "square", "small", "top", ((30, 5), (45, 10), (60, 8)))
    targets = cell_targets(Scene(96, (250, 250, 250), (trio,)), side=4, words=words)
    bag = words.vectors["green"] + words.vectors["square"] + words.vectors["top"]
    bag = bag + words.vectors["3"]
    torch.testing.assert_close(targets[1], words.mean + bag)
    torch.testing.assert_close(targets[2], words.mean + bag)


def test_count_words_are_the_bare_digits_answers_are_written_in() -> None:
    model, tokenizer = make_model(seed=0)
    table = model.language_model.get_input_embeddings().weight.detach().float()
    words = WordVectors(table, tokenizer)
    ids = tokenizer("3", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(words.vectors["3"], table[ids].mean(0) - words.mean)


def test_alignment_trains_only_the_projector_and_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model, tokenizer = make_model(seed=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("projector")}
    history = align_projector(
        model, tokenizer, AlignConfig(steps=30, batch_size=8, lr=5e-3, log_every=1)
    )
    assert history[0]["stage"] == "projector_alignment" and len(history) == 30
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    for name in ("colour_shape_acc", "region_acc", "count_acc"):
        assert all(0.0 <= h[name] <= 1.0 for h in history)
    for key, value in model.state_dict().items():
        if key in frozen:
            torch.testing.assert_close(value, frozen[key], msg=key)
