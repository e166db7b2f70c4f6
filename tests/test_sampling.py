"""SamplingParams validation and the shared next-token rule."""

from __future__ import annotations

import pytest
import torch

from visualchat.sampling import SamplingParams, make_generator, sample_next_token

LOGITS = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.3, 1.9, -3.0, 0.0])  # argmax 1, then 5, then 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, r"max_tokens must be a positive integer, got 0"),
        ({"max_tokens": 2.5}, r"max_tokens must be a positive integer, got 2.5"),
        ({"temperature": -0.1}, r"temperature must be in \[0, 100\], got -0.1"),
        ({"temperature": 101.0}, r"temperature must be in \[0, 100\], got 101.0"),
        ({"temperature": float("nan")}, r"temperature must be in \[0, 100\], got nan"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -1}, r"top_k must be a non-negative integer, got -1"),
        ({"top_k": 2.0}, r"top_k must be a non-negative integer, got 2.0"),
        ({"stop": ("ok", "")}, r"stop strings must be non-empty"),
    ],
)
def test_invalid_params_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        SamplingParams(**kwargs)


def test_stop_is_normalised_to_a_tuple() -> None:
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().stop == ()


def test_greedy_flags() -> None:
    assert SamplingParams().is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


def test_greedy_is_argmax() -> None:
    assert sample_next_token(LOGITS, SamplingParams()) == 1
    assert sample_next_token(-LOGITS, SamplingParams()) == 6


def test_top_k_1_is_greedy_whatever_the_temperature() -> None:
    params = SamplingParams(temperature=50.0, top_k=1)
    for seed in range(5):
        assert sample_next_token(LOGITS, params, torch.Generator().manual_seed(seed)) == 1


def draws(params: SamplingParams, num_draws: int = 30) -> list[int]:
    generator = make_generator(params)
    return [sample_next_token(LOGITS, params, generator) for _ in range(num_draws)]


def test_seeded_sampling_is_reproducible() -> None:
    params = SamplingParams(temperature=3.0, seed=1234)
    first = draws(params)
    assert draws(params) == first
    assert len(set(first)) > 2  # it really samples
    assert draws(SamplingParams(temperature=3.0, seed=4321)) != first


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    params = SamplingParams(temperature=5.0, top_p=1e-6, seed=0)
    generator = make_generator(params)
    assert {sample_next_token(LOGITS, params, generator) for _ in range(50)} == {1}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    generator = make_generator(params)
    seen = {sample_next_token(logits, params, generator) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 so token 1 is needed; 0.8 >= 0.75 so token 2 is not


def test_top_k_masks_all_but_the_k_best() -> None:
    params = SamplingParams(temperature=100.0, top_k=3, seed=0)
    generator = make_generator(params)
    seen = {sample_next_token(LOGITS, params, generator) for _ in range(300)}
    assert seen == {1, 5, 3}


def test_top_k_larger_than_the_vocabulary_keeps_everything() -> None:
    params = SamplingParams(temperature=100.0, top_k=50, seed=0)
    generator = make_generator(params)
    seen = {sample_next_token(LOGITS, params, generator) for _ in range(400)}
    assert seen == set(range(8))


def test_sampling_follows_the_softmax() -> None:
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    params = SamplingParams(temperature=1.0, seed=0)
    generator = make_generator(params)
    draws = torch.tensor([sample_next_token(logits, params, generator) for _ in range(3000)])
    frequencies = torch.bincount(draws, minlength=3).float() / 3000
    torch.testing.assert_close(frequencies, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_unseeded_generators_differ() -> None:
    params = SamplingParams(temperature=1.0)
    a, b = make_generator(params), make_generator(params)
    assert a.initial_seed() != b.initial_seed()
