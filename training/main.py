"""`python -m training.main recipe.yaml`, or one process per device under a launcher:

    accelerate launch --num_processes 8 -m training.main recipe.yaml          # GPUs, DDP
    accelerate launch --config_file training/deepspeed/accelerate_zero2.yaml \
        -m training.main recipe.yaml                                          # DeepSpeed ZeRO-2
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        -m training.main recipe.yaml                                          # CPU, DDP (gloo)

(accelerate 1.15's `launch --cpu --num_processes N` starts N processes only through mpirun;
without MPI it starts one, hence `--multi_gpu` with ACCELERATE_USE_CPU=1 for CPU runs.)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # training never fetches weights
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.main", description="Train VisualChat from a YAML recipe."
    )
    parser.add_argument("recipe", help="YAML recipe (see training/recipes/)")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse to continue an existing run instead of resuming from its latest checkpoint",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set model.attention=causal --set stages.0.steps=60",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training.config import TrainConfig

    try:
        config = TrainConfig.from_yaml(args.recipe, args.set)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Not PartialState(): the Trainer's Accelerator must be the first to set up the state.
    is_main = os.environ.get("RANK", "0") == "0"
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from training.trainer import run_training

    try:
        result = run_training(config, resume=not args.no_resume)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        logging.getLogger("training").error("%s", err)
        return 1
    logging.getLogger("training").info(
        "finished at step %d; delta checkpoint in %s", result.global_step, result.final_dir
    )
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
