"""VisualChatProcessor: exact ids, placeholder runs, modality tags, spans, pixels, labels,
agreement with the tokenizer's own chat template, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import (
    BLUE,
    CHATML_TEMPLATE,
    GREEN,
    RED,
    TRIMMING_TEMPLATE,
    make_conversation,
    make_image,
    make_tokenizer,
    png_bytes,
)

from visualchat.images import ImageError, ImageLimits, image_digest, load_image
from visualchat.messages import Conversation
from visualchat.processor import (
    IGNORE_INDEX,
    ContextLengthError,
    ImageSpan,
    ProcessedInputs,
    VisualChatProcessor,
)
from visualchat.template import IMAGE_MARKER

NUM_IMAGE_TOKENS = 16
IMAGE_TOKEN_ID = 3  # not the model default (0), to show the processor writes the id it is given


def fake_transform(image) -> torch.Tensor:
    """(3, 32, 32) filled with the image's mean colour: distinct per colour, cheap."""
    r, g, b = (sum(c) / len(c) for c in zip(*image.getdata(), strict=True))
    return torch.tensor([r, g, b]).view(3, 1, 1).expand(3, 32, 32).clone()


def make_processor(tokenizer=None, **kwargs) -> VisualChatProcessor:
    return VisualChatProcessor(
        tokenizer or make_tokenizer(),
        fake_transform,
        NUM_IMAGE_TOKENS,
        image_token_id=IMAGE_TOKEN_ID,
        **kwargs,
    )


def two_round_conversation() -> Conversation:
    return make_conversation(
        [make_image(RED), make_image(GREEN), "compare"],
        "reply1",
        ["and", make_image(BLUE), "now?"],
        "reply2",
        system="Be brief.",
    )


def expected_ids(rendered: str) -> list[int]:
    """Token ids of a hand-written rendered prompt, each marker a placeholder run."""
    tokenizer = make_tokenizer()
    ids: list[int] = []
    for i, piece in enumerate(rendered.split(IMAGE_MARKER)):
        if i:
            ids += [IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def test_placeholder_runs_modality_and_spans() -> None:
    red, green, blue = make_image(RED), make_image(GREEN), make_image(BLUE)
    conversation = make_conversation(["Look", red, "and", green], "ok", [blue, "this?"])
    inputs = make_processor()(conversation)
    assert isinstance(inputs, ProcessedInputs)
    rendered = (
        f"<|im_start|>user\nLook\nImage 1: {IMAGE_MARKER}\nand\nImage 2: {IMAGE_MARKER}"
        "<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
        f"<|im_start|>user\nImage 3: {IMAGE_MARKER}\nthis?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The reply is tokenized on its own, so build the expectation in the same three pieces.
    head, tail = rendered.split("ok<|im_end|>")
    tokenizer = make_tokenizer()
    ids = (
        expected_ids(head)
        + tokenizer("ok<|im_end|>", add_special_tokens=False)["input_ids"]
        + expected_ids(tail)
    )
    assert inputs.input_ids.tolist() == ids
    assert inputs.input_ids.dtype == inputs.token_modality.dtype == torch.long
    assert inputs.num_tokens == len(ids)
    assert inputs.num_images == 3
    starts = [span.start for span in inputs.image_spans]
    assert inputs.image_spans == [
        ImageSpan(starts[0], NUM_IMAGE_TOKENS, 0),
        ImageSpan(starts[1], NUM_IMAGE_TOKENS, 1),
        ImageSpan(starts[2], NUM_IMAGE_TOKENS, 2),
    ]
    expected_modality = [0] * len(ids)
    for k, start in enumerate(starts, start=1):
        assert inputs.input_ids[start : start + 16].tolist() == [IMAGE_TOKEN_ID] * 16
        expected_modality[start : start + 16] = [k] * 16
    assert inputs.token_modality.tolist() == expected_modality
    # Nothing but the runs carries the placeholder id; the runs sit after "Image k: ".
    assert (inputs.input_ids == IMAGE_TOKEN_ID).sum() == 48
    for k, start in enumerate(starts, start=1):
        before = tokenizer.decode(inputs.input_ids[:start])
        assert before.endswith(f"Image {k}: "), before
    assert inputs.labels is None


def test_pixel_values_and_digests() -> None:
    red_a, red_b, blue = make_image(RED), make_image(RED), make_image(BLUE)
    conversation = make_conversation([red_a, blue], "ok", [red_b, "again"])
    inputs = make_processor()(conversation)
    assert inputs.pixel_values.shape == (3, 3, 32, 32)
    assert torch.equal(inputs.pixel_values[0], fake_transform(red_a))
    assert torch.equal(inputs.pixel_values[1], fake_transform(blue))
    assert len(inputs.image_digests) == 3
    assert inputs.image_digests[0] == inputs.image_digests[2]  # equal pixels, equal digest
    assert inputs.image_digests[0] != inputs.image_digests[1]
    assert inputs.image_digests[1] == image_digest(load_image(blue))


def test_digest_is_the_same_however_the_image_arrives(tmp_path: Path) -> None:
    image = make_image(GREEN)
    path = tmp_path / "green.png"
    image.save(path)
    conversation = Conversation()
    conversation.add_user("three ways", [image, png_bytes(image), str(path), path])
    inputs = make_processor()(conversation)
    assert len(set(inputs.image_digests)) == 1
    assert inputs.pixel_values.shape == (4, 3, 32, 32)


def test_text_only_conversation_has_no_pixels() -> None:
    inputs = make_processor()(make_conversation("hello"))
    assert inputs.pixel_values is None
    assert inputs.image_spans == []
    assert inputs.image_digests == []
    assert inputs.token_modality.tolist() == [0] * inputs.num_tokens


def test_labels_cover_exactly_the_replies_and_their_end_token() -> None:
    tokenizer = make_tokenizer()
    inputs = make_processor()(two_round_conversation(), with_labels=True)
    labels, ids = inputs.labels.tolist(), inputs.input_ids.tolist()
    assert len(labels) == len(ids)
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    assert tokenizer.decode([labels[i] for i in trained]) == "reply1<|im_end|>reply2<|im_end|>"
    # Two contiguous runs, each ending with <|im_end|>.
    runs = [[trained[0]]]
    for i in trained[1:]:
        if i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    assert [tokenizer.decode([ids[i] for i in run]) for run in runs] == [
        "reply1<|im_end|>",
        "reply2<|im_end|>",
    ]
    assert all(ids[run[-1]] == tokenizer.eos_token_id for run in runs)
    # Everything else (system, user turns, images, role headers, generation prompt) is -100.
    untrained = tokenizer.decode([ids[i] for i in range(len(ids)) if i not in set(trained)])
    assert untrained.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert untrained.endswith("now?<|im_end|>\n<|im_start|>assistant\n\n<|im_start|>assistant\n")
    for span in inputs.image_spans:
        assert labels[span.start : span.start + span.length] == [IGNORE_INDEX] * 16


def test_labels_of_the_last_reply_without_generation_prompt() -> None:
    tokenizer = make_tokenizer()
    conversation = make_conversation([make_image(RED), "hi"], "hello there")
    inputs = make_processor()(conversation, add_generation_prompt=False, with_labels=True)
    trained = [label for label in inputs.labels.tolist() if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "hello there<|im_end|>"
    assert tokenizer.decode(inputs.input_ids[-1:]) == "\n"  # the template's newline, untrained
    assert inputs.labels[-1] == IGNORE_INDEX


def plain_messages(conversation: Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.text} for m in conversation.messages]


def text_conversation() -> Conversation:
    return make_conversation(
        "Hello world!", "The quick brown fox.", "中文 🙂 héllo?", system="Be brief."
    )


def test_text_prompt_equals_the_tokenizers_own_chat_template() -> None:
    tokenizer = make_tokenizer()
    conversation = text_conversation()
    inputs = make_processor(tokenizer)(conversation)
    expected = tokenizer.apply_chat_template(
        plain_messages(conversation), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert inputs.input_ids.tolist() == list(expected)


def test_text_prompt_uses_the_fallback_template_without_one() -> None:
    bare = make_tokenizer(with_chat_template=False)
    conversation = text_conversation()
    inputs = make_processor(bare)(conversation)
    expected = bare.apply_chat_template(
        plain_messages(conversation),
        chat_template=CHATML_TEMPLATE,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert inputs.input_ids.tolist() == list(expected)


def test_prompt_under_a_trimming_template_equals_the_tokenizers_own() -> None:
    # A previous reply that ends in a space, under a Llama-3-style `| trim` template.
    tokenizer = make_tokenizer(TRIMMING_TEMPLATE)
    conversation = make_conversation("hi", "Sure! ", "more")
    inputs = make_processor(tokenizer)(conversation, with_labels=True)
    expected = tokenizer.apply_chat_template(
        plain_messages(conversation), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert inputs.input_ids.tolist() == list(expected)
    trained = [label for label in inputs.labels.tolist() if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Sure!<|im_end|>"


# --- errors -----------------------------------------------------------------------------------


def test_over_context_prompt_raises_context_length_error() -> None:
    conversation = make_conversation([make_image(RED), "hi"])
    fits = make_processor(max_length=100)(conversation)
    with pytest.raises(
        ContextLengthError,
        match=rf"^the conversation is {fits.num_tokens} tokens \(1 images x 16 tokens\) but the "
        rf"model's context is {fits.num_tokens - 1}; start a new chat or send fewer images$",
    ):
        make_processor(max_length=fits.num_tokens - 1)(conversation)
    assert make_processor(max_length=fits.num_tokens)(conversation).num_tokens == fits.num_tokens
    assert issubclass(ContextLengthError, ValueError)


def test_too_many_images_raises_image_error() -> None:
    images = [make_image(c) for c in (RED, GREEN, BLUE)]
    processor = make_processor(limits=ImageLimits(max_images=2))
    with pytest.raises(ImageError, match=r"^too many images: 3 \(max 2 per conversation"):
        processor(make_conversation([*images, "all"]))
    # The count is per conversation: 2 + 1 over two turns is too many as well.
    with pytest.raises(ImageError, match=r"^too many images: 3 \(max 2"):
        processor(make_conversation(images[:2], "ok", images[2:]))
    # A per-call limit overrides the processor's.
    inputs = processor(make_conversation([*images, "all"]), limits=ImageLimits(max_images=3))
    assert inputs.num_images == 3


def test_corrupt_image_bytes_raise_naming_the_image() -> None:
    conversation = Conversation()
    conversation.add_user("look", [make_image(RED), b"\x89PNG\r\n\x1a\n not really"])
    with pytest.raises(ImageError, match=r"^Image 2\b.*not an image"):
        make_processor()(conversation)


def test_corrupt_image_file_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "holiday.png"
    bad.write_bytes(png_bytes(make_image(RED))[:40])  # truncated
    conversation = Conversation()
    conversation.add_user("look", [make_image(RED), str(bad)])
    with pytest.raises(ImageError, match=r"^Image 2 \(.*holiday\.png\): "):
        make_processor()(conversation)


def test_preloaded_images_must_match_the_slots() -> None:
    conversation = make_conversation([make_image(RED), make_image(GREEN), "two"])
    with pytest.raises(ValueError, match=r"^2 image slots in the prompt but 1 images$"):
        make_processor()(conversation, images=[make_image(RED)])
    inputs = make_processor()(conversation, images=[make_image(BLUE), make_image(BLUE)])
    assert inputs.image_digests[0] == inputs.image_digests[1]


def test_num_image_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_image_tokens must be positive, got 0"):
        VisualChatProcessor(make_tokenizer(), fake_transform, 0)


def test_for_model_prompts_with_the_models_default_system_turn() -> None:
    from factories import make_model

    model, tokenizer = make_model()
    conversation = make_conversation("Hello world!", "The quick brown fox.", "and?")
    assert VisualChatProcessor.for_model(model, tokenizer).template.default_system is None
    model.config.default_system = "Answer briefly."
    inputs = VisualChatProcessor.for_model(model, tokenizer)(conversation)
    system = [{"role": "system", "content": "Answer briefly."}]
    expected = tokenizer.apply_chat_template(
        system + plain_messages(conversation),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert inputs.input_ids.tolist() == list(expected)
