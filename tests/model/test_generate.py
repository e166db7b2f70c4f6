"""The reference decoder against a manual argmax loop over full (no-cache) forwards."""

from __future__ import annotations

import pytest
import torch
from factories import GREEN, RED, make_conversation, make_image, make_model

from visualchat.model.generate import generate, stop_token_ids, stream_tokens
from visualchat.model.modeling import VisualChatModel
from visualchat.processor import ContextLengthError, ProcessedInputs, VisualChatProcessor
from visualchat.sampling import SamplingParams


def process(model: VisualChatModel, tokenizer, conversation=None) -> ProcessedInputs:
    processor = VisualChatProcessor(
        tokenizer,
        model.vision.image_transform(),
        model.num_image_tokens,
        image_token_id=model.config.image_token_id,
    )
    if conversation is None:
        conversation = make_conversation(
            [make_image(RED), make_image(GREEN), "Compare the two images."],
            "The first image is red.",
            ["And the colors?"],
        )
    return processor(conversation)


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = make_model("mmca")
    return model, tokenizer, process(model, tokenizer)


@torch.no_grad()
def manual_greedy(model, inputs: ProcessedInputs, num_tokens: int, stops=()) -> list[int]:
    """argmax of a full forward over prompt + generated ids, every step from scratch."""
    ids = inputs.input_ids.tolist()
    tags = inputs.token_modality.tolist()
    generated: list[int] = []
    for _ in range(num_tokens):
        logits = model(
            torch.tensor([ids]), torch.tensor([tags]), pixel_values=inputs.pixel_values
        ).logits
        token_id = int(logits[0, -1].argmax())
        generated.append(token_id)
        if token_id in stops:
            break
        ids.append(token_id)
        tags.append(0)
    return generated


def test_greedy_equals_a_manual_argmax_loop(setup) -> None:
    model, tokenizer, inputs = setup
    assert inputs.num_images == 2
    expected = manual_greedy(model, inputs, 12)
    output = generate(model, tokenizer, inputs, SamplingParams(max_tokens=12, ignore_eos=True))
    assert output.token_ids == expected
    assert output.finish_reason == "length"
    assert output.num_prompt_tokens == inputs.num_tokens
    assert output.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert len(set(expected)) > 1  # not a degenerate model


def test_greedy_with_eos_equals_a_manual_loop_that_stops_at_eos(setup) -> None:
    model, tokenizer, inputs = setup
    stops = stop_token_ids(model, tokenizer)
    assert stops == {tokenizer.eos_token_id}
    expected = manual_greedy(model, inputs, 12, stops)
    output = generate(model, tokenizer, inputs, SamplingParams(max_tokens=12))
    assert output.token_ids == expected


def test_cached_image_features_give_the_same_output(setup) -> None:
    model, tokenizer, inputs = setup
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with torch.no_grad():
        features = model.encode_images(inputs.pixel_values)
    with_features = generate(model, tokenizer, inputs, params, image_features=features)
    assert with_features.token_ids == generate(model, tokenizer, inputs, params).token_ids


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_finishes_with_length(setup, max_tokens: int) -> None:
    model, tokenizer, inputs = setup
    output = generate(model, tokenizer, inputs, SamplingParams(max_tokens=max_tokens))
    if tokenizer.eos_token_id in output.token_ids:
        pytest.fail("the fixture model emitted eos early; pick another seed")
    assert output.finish_reason == "length"
    assert len(output.token_ids) == max_tokens


def greedy_ids(model, tokenizer, inputs, n: int = 10) -> list[int]:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    return generate(model, tokenizer, inputs, params).token_ids


def test_eos_finishes_with_stop_and_ignore_eos_keeps_going() -> None:
    model, tokenizer = make_model("mmca")
    inputs = process(model, tokenizer)
    greedy = greedy_ids(model, tokenizer, inputs)
    # Declare the third greedy token an end-of-sequence id of the backbone.
    k = next(i for i in range(2, 10) if greedy[i] not in greedy[:i])
    model.language_model.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy[k]]
    assert stop_token_ids(model, tokenizer) == {tokenizer.eos_token_id, greedy[k]}
    output = generate(model, tokenizer, inputs, SamplingParams(max_tokens=10))
    assert output.finish_reason == "stop"
    assert output.token_ids == greedy[: k + 1]  # the eos id is reported...
    assert output.text == tokenizer.decode(greedy[:k], skip_special_tokens=True)  # ...not shown
    ignoring = generate(model, tokenizer, inputs, SamplingParams(max_tokens=10, ignore_eos=True))
    assert ignoring.finish_reason == "length"
    assert ignoring.token_ids == greedy


def test_seeded_sampling_is_reproducible(setup) -> None:
    model, tokenizer, inputs = setup

    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=8, temperature=1.5, seed=seed, ignore_eos=True)
        return generate(model, tokenizer, inputs, params).token_ids

    first = sample(11)
    assert len(first) == 8
    assert sample(11) == first
    assert any(sample(seed) != first for seed in (12, 13, 14))


def test_stop_string_finishes_with_stop_and_truncates(setup) -> None:
    model, tokenizer, inputs = setup
    full = generate(model, tokenizer, inputs, SamplingParams(max_tokens=16, ignore_eos=True))
    text = full.text
    assert len(text) >= 8, text
    stop = text[4:7]
    cut = text.index(stop)
    output = generate(model, tokenizer, inputs, SamplingParams(max_tokens=16, stop=(stop,)))
    assert output.finish_reason == "stop"
    assert output.text == text[:cut]
    assert stop not in output.text
    # It stopped at the token that completed the stop string.
    num_ids = len(output.token_ids)
    assert stop in tokenizer.decode(full.token_ids[:num_ids])
    assert stop not in tokenizer.decode(full.token_ids[: num_ids - 1])
    assert output.token_ids == full.token_ids[:num_ids]


def test_stream_events_carry_deltas_and_one_finish_reason(setup) -> None:
    model, tokenizer, inputs = setup
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    events = list(stream_tokens(model, tokenizer, inputs, params))
    assert len(events) == 7
    assert [e.finish_reason for e in events] == [None] * 6 + ["length"]
    output = generate(model, tokenizer, inputs, params)
    assert "".join(e.delta for e in events) == output.text
    assert [e.token_id for e in events] == output.token_ids


def test_prompt_at_the_context_limit_raises() -> None:
    model, tokenizer = make_model("mmca")
    inputs = process(model, tokenizer)
    model.language_model.config.max_position_embeddings = inputs.num_tokens
    with pytest.raises(
        ContextLengthError,
        match=rf"the prompt is {inputs.num_tokens} tokens but the model's context is "
        rf"{inputs.num_tokens}",
    ):
        generate(model, tokenizer, inputs, SamplingParams())


def test_generation_stops_at_the_context_limit() -> None:
    model, tokenizer = make_model("mmca")
    inputs = process(model, tokenizer)
    model.language_model.config.max_position_embeddings = inputs.num_tokens + 3
    output = generate(model, tokenizer, inputs, SamplingParams(max_tokens=50, ignore_eos=True))
    assert output.finish_reason == "length"
    assert len(output.token_ids) == 3  # prompt + reply fill the context exactly
