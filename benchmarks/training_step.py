"""What one stage-1 training micro-batch of the embedded recipe costs on CPU, by attention kernel,
and how much of a step is padding for each micro-batch split.

The trainer runs causal attention through transformers' eager kernel on CPU
(`training.trainer.use_training_attention`); this times forward + backward of one micro-batch
(bf16 autocast, LoRA r 16 on every projection, projector trainable, as the recipe trains) with
SDPA and with eager, on conversations of similar length from the training blend. It also reports
the padded fraction of the tokens of the recipe's first 400 steps when each step's 16
length-sorted samples are cut into 2 x 8 or 4 x 4 micro-batches (on the trainer's approximate
lengths plus the chat template's fixed tokens, measured on the same batch).

With --fast it also times the eager step with the recipe switches of `training.fast_step`
(frozen linear weights held in bf16, then also the decoder layers compiled; the compile's
first call is reported apart, not in the median).

    python benchmarks/training_step.py [--batch 8] [--repeats 4] [--fast] [--out result.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from training.collator import Collator
from training.config import LoraSpec, TrainConfig
from training.data import DataOrder, approximate_lengths, open_blended, plan_micro_batches
from training.embedded import build_embedded
from training.fast_step import FrozenBf16, compile_decoder_layers
from training.model_init import attach_lora, set_trainable
from training.stages import lm_loss
from training.trainer import TRAINING_IMAGE_LIMITS
from visualchat.atomic import atomic_write_json
from visualchat.processor import VisualChatProcessor

RECIPE = "training/recipes/embedded.yaml"


def padded_fraction(lengths, order: DataOrder, batch_size: int, grad_accum: int, steps: int):
    plan = plan_micro_batches(
        order, 0, steps * grad_accum, batch_size, 1, 0, lengths=lengths, grad_accum=grad_accum
    )
    real = sum(int(lengths[i]) for micro in plan for i in micro)
    padded = sum(max(int(lengths[i]) for i in micro) * len(micro) for micro in plan)
    return 1 - real / padded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="conversations per micro-batch")
    parser.add_argument("--repeats", type=int, default=4, help="timed micro-batches per kernel")
    parser.add_argument(
        "--fast", action="store_true", help="also time the fast_step switches (compiles once)"
    )
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    recipe = TrainConfig.from_yaml(RECIPE)
    stage = recipe.stages[0]
    model, tokenizer = build_embedded(
        recipe.model.factory_kwargs["vision_weights"], attention="causal", calibration_images=0
    )
    attach_lora(model, stage.lora or LoraSpec())
    set_trainable(model, stage.trainable)
    model.train()
    data = open_blended(recipe.data.train)
    lengths = approximate_lengths(data, model.num_image_tokens)
    target = int(statistics.median(lengths[:2000]))
    picked = [i for i in range(len(data)) if lengths[i] == target][: args.batch]
    processor = VisualChatProcessor.for_model(model, tokenizer, limits=TRAINING_IMAGE_LIMITS)
    batch = Collator(processor, recipe.data.max_length)([data[i] for i in picked])
    template_tokens = batch.input_ids.shape[1] - target  # chat template and image labels

    def micro_batch() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, batch)
        loss.backward()

    def timed() -> tuple[float, float]:
        """(first call, median of the repeats) in seconds."""
        started = time.perf_counter()
        micro_batch()  # warm-up (and compilation)
        first = time.perf_counter() - started
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            micro_batch()
            times.append(time.perf_counter() - started)
        return first, statistics.median(times)

    seconds: dict[str, float] = {}
    for kernel in ("sdpa", "eager"):
        model.language_model.set_attn_implementation(kernel)
        seconds[kernel] = timed()[1]
    first_compiled = None
    if args.fast:  # eager attention, as the trainer runs causal models on CPU
        frozen = FrozenBf16(model.language_model)
        frozen.apply()
        seconds["eager+frozen_bf16"] = timed()[1]
        compile_decoder_layers(model.language_model)
        first_compiled, seconds["eager+frozen_bf16+compile"] = timed()
        frozen.restore()
    order = DataOrder(len(data), recipe.run.seed)
    padding = {
        f"{b}x{a}": padded_fraction(lengths + template_tokens, order, b, a, steps=400)
        for b, a in ((8, 2), (4, 4))
    }
    print(f"micro-batch of {tuple(batch.input_ids.shape)} tokens, forward + backward:")
    for kernel, s in seconds.items():
        print(f"  {kernel:25s} {s:.2f} s  ({seconds['eager'] / s:.2f}x eager)")
    if first_compiled is not None:
        print(f"  first compiled micro-batch (compiles the layers): {first_compiled:.1f} s")
    print(
        "padded share of the tokens, 16 samples per step: "
        + ", ".join(f"{split} {100 * share:.0f}%" for split, share in padding.items())
    )
    if args.out is not None:
        atomic_write_json(
            args.out,
            {
                "micro_batch_shape": list(batch.input_ids.shape),
                "threads": torch.get_num_threads(),
                "fwd_bwd_s": seconds,
                "first_compiled_s": first_compiled,
                "padded_share": padding,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
