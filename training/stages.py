"""Stage kinds: how a stage turns a micro-batch into a loss.

The training loop knows nothing about what a stage computes. It asks the stage's kind for a
collator (records -> batch), for the number of units the loss is summed over (label tokens for
the LM loss), and for the summed loss of one micro-batch; it then normalises by the units of the
whole optimiser step across every rank, so the gradient is the same whatever the number of
processes or micro-batches. Adding a kind (say "vision_pretrain", a contrastive loss on the
vision tower) is one `register_stage_kind` call; the loop does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from training.collator import Batch, Collator
from visualchat.processor import IGNORE_INDEX, VisualChatProcessor


class StageBatch(Protocol):
    """What the loop reads from any kind's batch."""

    num_samples: int  # real samples in this micro-batch
    num_dropped: int  # samples the collator dropped

    @property
    def num_tokens(self) -> int: ...  # for tokens/s

    def to(self, device: torch.device | str) -> StageBatch: ...


@dataclass(frozen=True)
class StageKind:
    # (model, micro-batch) -> scalar loss summed over the micro-batch's units (graph attached)
    loss: Callable[[nn.Module, Any], torch.Tensor]
    # micro-batch -> number of units its loss sums over
    num_units: Callable[[Any], int]
    # (processor, max_length) -> records -> micro-batch; must be picklable for DataLoader workers
    make_collator: Callable[[VisualChatProcessor, int], Callable[[Sequence[Mapping]], Any]] = (
        Collator
    )


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy on the assistant replies, summed over label tokens.

    Only positions whose next token is a label go through the LM head: replies are a few tokens
    of a conversation of ~140, and the head (49k vocabulary x hidden for SmolLM2) is otherwise a
    fifth of the compute of a training step on a small backbone.
    """
    targets = batch.labels[:, 1:]  # (batch, seq - 1): position t predicts t + 1
    keep = F.pad(targets != IGNORE_INDEX, (0, 1))  # (batch, seq) bool
    out = model(
        input_ids=batch.input_ids,
        token_modality=batch.token_modality,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
        logits_to_keep=keep,
    )
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()  # (kept, vocab)
    return F.cross_entropy(logits, targets[targets != IGNORE_INDEX], reduction="sum")


STAGE_KINDS: dict[str, StageKind] = {
    "lm": StageKind(loss=lm_loss, num_units=lambda batch: batch.num_label_tokens),
}


def register_stage_kind(name: str, kind: StageKind) -> None:
    """Make `kind: <name>` usable in recipes (register before the recipe is loaded)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a stage kind needs a non-empty name, got {name!r}")
    if name in STAGE_KINDS and STAGE_KINDS[name] is not kind:
        raise ValueError(f"stage kind {name!r} is already registered")
    STAGE_KINDS[name] = kind
