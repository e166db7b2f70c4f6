"""Exports of a finished run: the delta it writes, and a merged full checkpoint from a delta."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from training.model_init import quiet_peft
from visualchat.model import loading

logger = logging.getLogger(__name__)


def export_merged(
    delta_folder: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32"
) -> Path:
    """A full VisualChat checkpoint (backbone included, LoRA merged into it) from a delta.

    `loading.load_pretrained` of a delta loads its base backbone and merges the adapter
    (peft merge_and_unload); saving that model writes every weight, atomically."""
    with quiet_peft():
        model, tokenizer = loading.load_pretrained(
            delta_folder, loading.LoadOptions(device="cpu", dtype=dtype)
        )
    loading.save_pretrained(model, tokenizer, out)
    logger.info("wrote merged checkpoint %s", out)
    return Path(out)
