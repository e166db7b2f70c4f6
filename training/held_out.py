"""Held-out evaluation during training: LM loss on every rank's shard of the records, and
exact-match accuracy of greedy answers (training.evaluate) on the main process."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from training.collator import Collator
from training.evaluate import evaluate_records
from training.stages import lm_loss
from visualchat.images import ImageLimits
from visualchat.model.modeling import VisualChatModel


class HeldOut:
    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],  # the first run.eval_samples held-out records
        collator: Collator,
        tokenizer: PreTrainedTokenizerBase,
        limits: ImageLimits,
        with_accuracy: bool,
        max_tokens: int,  # per generated answer
    ) -> None:
        self.records = list(records)
        self.collator = collator
        self.tokenizer = tokenizer
        self.limits = limits
        self.with_accuracy = with_accuracy
        self.max_tokens = max_tokens

    def __bool__(self) -> bool:
        return bool(self.records)

    @torch.no_grad()
    def evaluate(self, model: VisualChatModel, accelerator: Any, batch_size: int) -> dict[str, Any]:
        """{"eval_loss", "eval_samples"[, "accuracy", "groups"]}; every rank must call it."""
        from visualchat.api import VisualChat

        was_training = model.training
        model.eval()
        shard = self.records[accelerator.process_index :: accelerator.num_processes]
        totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for start in range(0, len(shard), batch_size):
            batch = self.collator(shard[start : start + batch_size]).to(accelerator.device)
            totals[0] += float(lm_loss(model, batch))
            totals[1] += batch.num_label_tokens
        loss_sum, num_units = accelerator.reduce(totals, "sum").tolist()
        result: dict[str, Any] = {
            "eval_loss": loss_sum / max(num_units, 1.0),
            "eval_samples": len(self.records),
        }
        if self.with_accuracy and accelerator.is_main_process:
            chat = VisualChat(model, self.tokenizer, limits=self.limits)
            report = evaluate_records(chat, self.records, max_tokens=self.max_tokens)
            result["accuracy"] = report.overall().accuracy
            result["groups"] = {name: s.accuracy for name, s in report.by_group().items()}
        model.train(was_training)
        accelerator.wait_for_everyone()
        return result
