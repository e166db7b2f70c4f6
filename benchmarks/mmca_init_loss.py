"""How much does each attention mode disturb the frozen backbone before any training?

Loads the embedded recipe's starting point (pretrained vision tower, calibrated and aligned
projector, no LoRA) with MMCA and with causal attention and prints the answer-token loss on the
first training conversations (one projector for both: it is built once). MMCA adds a second,
separately normalised softmax over image keys to every text query of every head, with no
parameter to fade it in, so an untrained model's text path is disturbed much more than by
causal attention, where image keys share one softmax.

    python benchmarks/mmca_init_loss.py [--samples 16] [--out benchmarks/results/mmca_init_loss.json]
"""

from __future__ import annotations

import argparse
import sys

import torch

from training.collator import Collator
from training.data import open_blended
from training.embedded import build_embedded
from training.stages import lm_loss
from visualchat.atomic import atomic_write_json
from visualchat.processor import VisualChatProcessor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="runs/stage0/vision.safetensors")
    parser.add_argument("--data", default="data/blends/embedded_train")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--align-steps", type=int, default=300, help="as the recipe; 0: none")
    parser.add_argument("--out", default="benchmarks/results/mmca_init_loss.json")
    args = parser.parse_args(argv)
    dataset = open_blended(args.data)
    records = [dataset[i] for i in range(min(args.samples, len(dataset)))]
    results = {}
    projector = None
    for attention in ("mmca", "causal"):
        if projector is None:
            model, tokenizer = build_embedded(
                args.vision, attention=attention, align_steps=args.align_steps
            )
            projector = model.projector.state_dict()
        else:
            model, tokenizer = build_embedded(
                args.vision, attention=attention, calibration_images=0
            )
            model.projector.load_state_dict(projector)
        model.eval()
        batch = Collator(VisualChatProcessor.for_model(model, tokenizer), 1024)(records)
        with torch.no_grad():
            loss = float(lm_loss(model, batch)) / batch.num_label_tokens
        results[attention] = {"answer_token_loss": loss, "label_tokens": batch.num_label_tokens}
        print(f"{attention:7s} loss per answer token before training: {loss:.3f}")
    atomic_write_json(
        args.out,
        {
            "samples": len(records),
            "vision": args.vision,
            "align_steps": args.align_steps,
            **results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
