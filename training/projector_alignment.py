"""Stage 0b of the embedded recipe: align the projector to the language model's word embeddings.

Why. After stage 0 the patch tokens know which object covers them, but the projector is
random (calibrated only in scale), so the frozen LM receives vectors that mean nothing to it and
stage 1 has to discover, through the LM's loss, how to turn them into something the LM's
attention can look up ("which image token is the star?") and copy from ("red"). Measured on the
first embedded runs, it did not within 120 steps: colour, shape, position and cross-image
answers stayed at the training prior while words (large, unmistakable) were read.

So before the LM is in the loop, the projector learns to write each image token *in the LM's own
vocabulary*, as a bag of words: a token whose 24 x 24 px cell holds an object's centre becomes
the sum of the (mean-centred) embeddings of its group's colour, shape and region words and its
group's size (" red", " star", " left", "3"), added once per group with a centre in the cell; the
cell holding the written word's centre becomes that word; every other cell becomes
the embedding table's mean ("nothing here"). Targets come from the synthetic world's exact
scene description, training split only. It is a regression of the projector alone on frozen
patch tokens: no LM forward, seconds per step. Stage 1 then starts from tokens the LM's attention
can already match against the question's words, and fine-tunes the projector further.

This is the pseudo-caption idea of LLaVA's projector pretraining made dense and LM-free; it only
fits worlds whose per-region content is known (here, synthetic scenes).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from data_blend.sources.scenes import (
    COLOURS,
    MAX_COUNT,
    REGIONS,
    SHAPES,
    WORDS,
    Scene,
    generate_scene,
    render,
)
from training.vision_pretraining import cell_index
from visualchat.model.modeling import VisualChatModel

logger = logging.getLogger(__name__)

# Group sizes, as the digits count answers are written in (the assistant writes "3", not " 3").
COUNT_WORDS: tuple[str, ...] = tuple(str(n) for n in range(1, max(MAX_COUNT.values()) + 1))


@dataclass
class AlignConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("projector alignment steps and batch_size must be positive")


class WordVectors:
    """Mean-centred LM input embeddings of the words the targets are made of."""

    def __init__(self, embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> None:
        table = embeddings.detach().float()  # (vocab, hidden)
        self.mean = table.mean(0)  # (hidden,)
        self.vectors: dict[str, torch.Tensor] = {}
        for word in [*COLOURS, *SHAPES, *REGIONS, *WORDS, *COUNT_WORDS]:
            # Names space-prefixed, the form they take inside questions (a digit would become
            # " " + digit); a word split into several tokens is represented by their mean.
            text = word if word in COUNT_WORDS else " " + word
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            self.vectors[word] = table[ids].mean(0) - self.mean  # (hidden,)


def cell_targets(scene: Scene, side: int, words: WordVectors) -> torch.Tensor:
    """(side*side, hidden) target embeddings for a side x side grid of image tokens, row-major
    like `Projector.merge_patches`."""
    bags = torch.zeros(side * side, words.mean.numel())
    for group in scene.groups:
        vector = words.vectors[group.colour] + words.vectors[group.shape]
        vector = vector + words.vectors[group.region] + words.vectors[str(group.count)]
        # Once per cell, however many of the group's centres it holds: the count is in the bag.
        for cell in {cell_index(x, y, scene.image_size, side) for x, y in group.positions}:
            bags[cell] += vector
    if scene.word is not None and scene.word_box is not None:
        x0, y0, x1, y1 = scene.word_box
        centre = cell_index((x0 + x1) / 2, (y0 + y1) / 2, scene.image_size, side)
        bags[centre] += words.vectors[scene.word]
    return bags + words.mean  # (side*side, hidden)


def align_projector(
    model: VisualChatModel, tokenizer: PreTrainedTokenizerBase, cfg: AlignConfig
) -> list[dict]:
    """Train `model.projector` in place on frozen vision features; returns the logged history.

    Logged: the regression loss and, for object-centre tokens read out as bags of the target
    words, how often they name the object's own colour and shape (`colour_shape_acc`), its
    group's region (`region_acc`) and its group's size (`count_acc`).
    """
    words = WordVectors(model.language_model.get_input_embeddings().weight, tokenizer)
    side = math.isqrt(model.num_image_tokens)  # image tokens form a side x side grid
    rng = random.Random(cfg.seed)
    transform = model.vision.image_transform()
    size = model.vision.image_size[0]
    projector = model.projector
    projector.train()
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    )
    # Least-squares read-out of a token as a bag of the target words: the word vectors are
    # linearly independent (33 of them in the LM's 576 dimensions), so a perfect target decodes
    # exactly; raw dot products would not (common words like " red" and " black" have large
    # norms that dominate them).
    names = list(words.vectors)
    readout = torch.linalg.pinv(torch.stack([words.vectors[n] for n in names]))  # (hidden, words)
    history: list[dict] = []
    started = time.perf_counter()
    for step in range(cfg.steps):
        scenes = [generate_scene(rng, size, "train") for _ in range(cfg.batch_size)]
        pixels = torch.stack([transform(render(s)) for s in scenes])  # (b, 3, H, W)
        targets = torch.stack([cell_targets(s, side, words) for s in scenes])  # (b, cells, hidden)
        with torch.no_grad():
            patches = model.vision(pixels)  # (b, patches, width)
        outputs = projector(patches)  # (b, cells, hidden)
        loss = nn.functional.mse_loss(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            entry = {
                "stage": "projector_alignment",
                "step": step + 1,
                "loss": loss.item(),
                **_readable((outputs.detach() - words.mean) @ readout, names, scenes, side),
                "seconds": time.perf_counter() - started,
            }
            history.append(entry)
            logger.info("projector alignment %s", entry)
    projector.eval()
    return history


def _readable(
    coefficients: torch.Tensor,  # (b, cells, words) tokens decoded as weights of `names`
    names: list[str],
    scenes: list[Scene],
    side: int,
) -> dict[str, float]:
    """Fractions of object centres whose token decodes (the largest coefficient within each kind
    of word) to the object's colour and shape, its group's region, and its group's size."""
    ids = {
        kind: [names.index(w) for w in kind_words]
        for kind, kind_words in (
            ("colour", COLOURS),
            ("shape", SHAPES),
            ("region", REGIONS),
            ("count", COUNT_WORDS),
        )
    }

    def decoded(token: torch.Tensor, kind: str) -> str:
        return names[ids[kind][int(token[ids[kind]].argmax())]]

    hits = {"colour_shape_acc": 0, "region_acc": 0, "count_acc": 0}
    total = 0
    for b, scene in enumerate(scenes):
        for group in scene.groups:
            for x, y in group.positions:
                token = coefficients[b, cell_index(x, y, scene.image_size, side)]  # (words,)
                hits["colour_shape_acc"] += (
                    decoded(token, "colour") == group.colour
                    and decoded(token, "shape") == group.shape
                )
                hits["region_acc"] += decoded(token, "region") == group.region
                hits["count_acc"] += decoded(token, "count") == str(group.count)
                total += 1
    return {name: value / max(total, 1) for name, value in hits.items()}


def main(argv: list[str] | None = None) -> int:
    """`python -m training.projector_alignment --vision runs/stage0/vision.safetensors`: run
    stage 0b alone on the embedded default and print its read-out history (how well the aligned
    tokens decode to colour+shape, region and group size), to compare vision towers."""
    import argparse
    import json

    from training.embedded import build_embedded

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--vision", required=True, help="stage-0 ViT weights (safetensors)")
    parser.add_argument("--steps", type=int, default=AlignConfig.steps)
    parser.add_argument("--json", default=None, help="also write the history here")
    args = parser.parse_args(argv)
    model, tokenizer = build_embedded(vision_weights=args.vision, attention="causal")
    history = align_projector(model, tokenizer, AlignConfig(steps=args.steps))
    for entry in history:
        print(json.dumps(entry))
    if args.json is not None:
        from visualchat.atomic import atomic_write_json

        atomic_write_json(args.json, history)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
