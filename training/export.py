"""Exports of a finished run: the delta it writes, and a merged full checkpoint from a delta."""

from __future__ import annotations

import json
import logging
import os
import sys
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


def export_checkpoint_delta(
    checkpoint_folder: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
) -> Path:
    """A delta checkpoint (what a finished run writes as `final/`) from any step's training
    checkpoint: the recipe saved beside it rebuilds the starting model, the step's trained
    tensors are loaded into it. dtype (e.g. "float16") narrows the stored tensors."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from training.checkpoint import CONFIG_NAME, STATE_NAME, TENSORS_NAME
    from training.config import TrainConfig
    from training.model_init import attach_lora, init_model, load_group_tensors
    from visualchat.model.delta import save_delta

    folder = Path(checkpoint_folder)
    if not (folder / TENSORS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {TENSORS_NAME})")
    config = TrainConfig.from_dict(yaml.safe_load((folder / CONFIG_NAME).read_text()))
    stage_index = json.loads((folder / STATE_NAME).read_text())["stage_index"]
    groups = config.groups_trained_through(stage_index)
    init = init_model(config.model, config.run.seed, restoring=groups)
    if "lora" in groups:
        with quiet_peft():
            attach_lora(init.model, config.lora)
    load_group_tensors(init.model, load_file(str(folder / TENSORS_NAME)), groups, str(folder))
    base = init.base_backbone or config.model.init
    save_delta(init.model, out, base_backbone=base, dtype=getattr(torch, dtype) if dtype else None)
    logger.info("wrote delta checkpoint %s from %s", out, folder)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m training.export CHECKPOINT OUT [--dtype float16]`: a delta from a step's
    training checkpoint; `--merged` writes a full checkpoint from a delta instead."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.export", description=main.__doc__)
    parser.add_argument("source", help="runs/NAME/checkpoints/step-N (or a delta with --merged)")
    parser.add_argument("out")
    parser.add_argument("--dtype", default=None, help="stored dtype, e.g. float16")
    parser.add_argument("--merged", action="store_true", help="merge a delta into a full model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.merged:
            export_merged(args.source, args.out, dtype=args.dtype or "float32")
        else:
            export_checkpoint_delta(args.source, args.out, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
