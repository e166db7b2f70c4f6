"""Collator: right padding, -1 pad tags, the processor's label mask, pixel order, drops."""

from __future__ import annotations

import logging

import pytest
import torch
from training_fixtures import make_record

from tests.factories import make_model
from training.collator import Collator, record_conversation
from training.stages import lm_loss
from visualchat.processor import IGNORE_INDEX, VisualChatProcessor


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = make_model(seed=1)
    processor = VisualChatProcessor(tokenizer, model.vision.image_transform(), 16)
    return model, tokenizer, processor


# One single-image record, one two-image two-turn record, one single-image record.
RECORDS = [make_record(0), make_record(1, multi=True), make_record(2)]


def test_pads_tags_labels_and_pixels(tiny) -> None:
    model, tokenizer, processor = tiny
    batch = Collator(processor, max_length=1000)(RECORDS)
    expected = [
        processor(record_conversation(r), add_generation_prompt=False, with_labels=True)
        for r in RECORDS
    ]
    lengths = [e.num_tokens for e in expected]
    assert lengths[1] > max(lengths[0], lengths[2])  # the two-image record is longest
    assert batch.input_ids.shape == batch.labels.shape == (3, max(lengths))
    assert batch.num_samples == 3 and batch.num_dropped == 0
    for row, (sample, n) in enumerate(zip(expected, lengths, strict=True)):
        assert torch.equal(batch.input_ids[row, :n], sample.input_ids)
        assert torch.equal(batch.token_modality[row, :n], sample.token_modality)
        assert torch.equal(batch.labels[row, :n], sample.labels)
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch.input_ids[row, n:] == tokenizer.pad_token_id).all()
        assert (batch.token_modality[row, n:] == -1).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
    # Image tags restart at 1 in each row; the second row has images 1 and 2.
    assert sorted(set(batch.token_modality[1].tolist())) == [0, 1, 2]
    assert sorted(set(batch.token_modality[0].tolist())) == [-1, 0, 1]
    # Trained tokens: each reply and its end-of-turn token, exactly as the processor marks them.
    trained = [tokenizer.decode(batch.labels[r][batch.labels[r] != IGNORE_INDEX]) for r in range(3)]
    assert trained == ["red<|im_end|>", "Image 2<|im_end|>green<|im_end|>", "blue<|im_end|>"]
    assert batch.num_label_tokens == sum(int((e.labels != IGNORE_INDEX).sum()) for e in expected)
    # Pixels: batch order, then image order within a record (4 images in all).
    assert torch.equal(batch.pixel_values, torch.cat([e.pixel_values for e in expected]))
    assert batch.pixel_values.shape == (4, 3, 32, 32)


@torch.no_grad()
def test_batched_forward_equals_one_sample_at_a_time(tiny) -> None:
    """Padding and image splicing order leave every real position's logits unchanged."""
    model, _, processor = tiny
    collator = Collator(processor, max_length=1000)
    batch = collator(RECORDS)
    logits = model(
        batch.input_ids,
        batch.token_modality,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
    ).logits
    for row, record in enumerate(RECORDS):
        single = collator([record])
        alone = model(single.input_ids, single.token_modality, pixel_values=single.pixel_values)
        n = single.input_ids.shape[1]
        torch.testing.assert_close(logits[row, :n], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_over_long_samples_are_dropped_and_counted(tiny, caplog) -> None:
    _, _, processor = tiny
    lengths = [Collator(processor, 1000)([r]).input_ids.shape[1] for r in RECORDS]
    short = max(lengths[0], lengths[2])
    collator = Collator(processor, max_length=short)  # the two-image record is too long
    with caplog.at_level(logging.WARNING, logger="training.collator"):
        batch = collator(RECORDS)
    assert (batch.num_samples, batch.num_dropped) == (2, 1)
    assert batch.input_ids.shape == (2, short)
    assert batch.pixel_values.shape[0] == 2
    assert "dropped 1 of 3 samples longer than max_length=" in caplog.text


def test_an_all_dropped_batch_is_one_padding_row_with_zero_loss(tiny) -> None:
    model, tokenizer, processor = tiny
    batch = Collator(processor, max_length=5)(RECORDS[:2])
    assert (batch.num_samples, batch.num_dropped, batch.num_label_tokens) == (0, 2, 0)
    assert batch.input_ids.tolist() == [[tokenizer.pad_token_id]]
    assert batch.token_modality.tolist() == [[-1]] and batch.pixel_values is None
    # It still runs forward and backward (DDP needs every rank to), contributing nothing.
    model.zero_grad()
    loss = lm_loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(not g.any() for g in grads)


def test_lm_loss_on_label_positions_equals_the_full_logit_loss(tiny) -> None:
    # lm_loss only sends label positions through the LM head; the loss must not change.
    model, _, processor = tiny
    batch = Collator(processor, max_length=1000)(RECORDS)
    with torch.no_grad():
        loss = lm_loss(model, batch)
        logits = model(
            input_ids=batch.input_ids,
            token_modality=batch.token_modality,
            pixel_values=batch.pixel_values,
            attention_mask=batch.attention_mask,
        ).logits[:, :-1]  # (batch, seq - 1, vocab)
        full = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            batch.labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    assert batch.num_label_tokens > 3
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
