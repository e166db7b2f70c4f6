"""Blended records -> one padded training batch.

Each record (data_blend's layout: HF-style `messages` whose `{"type": "image"}` blocks take the
record's `images` in order) becomes a Conversation and goes through the same
`VisualChatProcessor` as inference, so training sees exactly the prompt layout and label mask
that serving uses. Rows are right-padded; every image of the batch is stacked in batch order
then image order, which is the row-major order in which `VisualChatModel.embed` splices them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from visualchat.messages import Conversation
from visualchat.model.attention import PADDING
from visualchat.processor import IGNORE_INDEX, ProcessedInputs, VisualChatProcessor

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq) long, right-padded with the pad id
    token_modality: torch.Tensor  # (batch, seq) long: 0 text, k image k of its row, -1 pad
    attention_mask: torch.Tensor  # (batch, seq) long: 1 real token, 0 pad
    labels: torch.Tensor  # (batch, seq) long: IGNORE_INDEX outside replies and at pads
    pixel_values: torch.Tensor | None  # (num_images, 3, H, W), batch order then image order
    num_samples: int  # real samples (0: every sample was dropped; one padding row stands in)
    num_dropped: int = 0  # samples dropped for being longer than max_length

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens, images included."""
        return int(self.attention_mask.sum())

    @property
    def num_label_tokens(self) -> int:
        """Tokens whose next token is trained (the LM loss is summed over these)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        pixels = None if self.pixel_values is None else self.pixel_values.to(device)
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            token_modality=self.token_modality.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            pixel_values=pixels,
        )


def record_conversation(record: Mapping[str, Any]) -> Conversation:
    """A blended record (messages + images) as a Conversation."""
    return Conversation.from_hf(record["messages"], record.get("images") or [])


class Collator:
    """records -> Batch. Picklable, so DataLoader workers can run it."""

    def __init__(self, processor: VisualChatProcessor, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.processor = processor
        self.max_length = max_length
        self.pad_token_id = processor.tokenizer.pad_token_id
        if self.pad_token_id is None:  # any id works: pads are masked and never trained
            self.pad_token_id = processor.tokenizer.eos_token_id or 0

    def process(self, record: Mapping[str, Any]) -> ProcessedInputs:
        return self.processor(
            record_conversation(record), add_generation_prompt=False, with_labels=True
        )

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> Batch:
        samples = [self.process(record) for record in records]
        kept = [s for s in samples if s.num_tokens <= self.max_length]
        num_dropped = len(samples) - len(kept)
        if num_dropped:
            logger.warning(
                "dropped %d of %d samples longer than max_length=%d tokens",
                num_dropped,
                len(samples),
                self.max_length,
            )
        return self.pad(kept, num_dropped)

    def pad(self, samples: Sequence[ProcessedInputs], num_dropped: int = 0) -> Batch:
        if not samples:
            # Under DDP every rank must run forward and backward each micro-batch; one padding
            # row with no trained label contributes exactly zero loss and zero gradient.
            return Batch(
                input_ids=torch.full((1, 1), self.pad_token_id, dtype=torch.long),
                token_modality=torch.full((1, 1), PADDING, dtype=torch.long),
                attention_mask=torch.zeros((1, 1), dtype=torch.long),
                labels=torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
                pixel_values=None,
                num_samples=0,
                num_dropped=num_dropped,
            )
        num_rows, seq_len = len(samples), max(s.num_tokens for s in samples)
        input_ids = torch.full((num_rows, seq_len), self.pad_token_id, dtype=torch.long)
        modality = torch.full((num_rows, seq_len), PADDING, dtype=torch.long)
        attention_mask = torch.zeros((num_rows, seq_len), dtype=torch.long)
        labels = torch.full((num_rows, seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = sample.num_tokens
            input_ids[row, :n] = sample.input_ids
            modality[row, :n] = sample.token_modality
            attention_mask[row, :n] = 1
            labels[row, :n] = sample.labels
        pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
        return Batch(
            input_ids=input_ids,
            token_modality=modality,
            attention_mask=attention_mask,
            labels=labels,
            pixel_values=torch.cat(pixels) if pixels else None,  # (num_images, 3, H, W)
            num_samples=num_rows,
            num_dropped=num_dropped,
        )
