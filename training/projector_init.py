"""Data-dependent initialisation of a linear/MLP projector (in the spirit of LSUV init).

Why: a freshly initialised projector maps patch tokens to vectors unlike the language model's
word embeddings. Measured on the embedded model, the image features came out with 24x the norm
of SmolLM2's embeddings, dominated by one direction shared by every image (the patch tokens'
dataset mean); after the LM's RMSNorm the image-specific part was ~15% of each vector, and
training stalled near the answer prior. Calibrating on a few hundred images fixes both before
the first step:

- the first layer sees standardised inputs: each input feature's dataset mean and standard
  deviation are folded into its weights and bias (exactly equal to standardising, no new
  module, nothing new to save);
- the last layer is rescaled and shifted so the outputs have the embedding table's per-feature
  mean and the embedding table's spread: image tokens enter the LM at the scale of words.
"""

from __future__ import annotations

import torch
from torch import nn

from visualchat.model.projector import Projector


def _linears(projector: Projector) -> list[nn.Linear]:
    if projector.config.type == "linear":
        return [projector.net]
    if projector.config.type == "mlp":
        return [projector.net[0], projector.net[-1]]
    raise ValueError("calibration applies to linear and mlp projectors, not a perceiver")


@torch.no_grad()
def calibrate_projector(
    projector: Projector,
    patches: torch.Tensor,  # (n, num_patches, vision_width) patch tokens of sample images
    embeddings: torch.Tensor,  # (vocab, hidden) the LM's input embedding table
) -> dict[str, float]:
    """Re-initialise `projector` in place from sample patch tokens; returns before/after
    statistics (output norm vs embedding norm) for the log."""
    first, last = _linears(projector)[0], _linears(projector)[-1]
    inputs = projector.merge_patches(patches.float()).flatten(0, 1)  # (N, width)
    before = projector(patches.float()).norm(dim=-1).mean().item()
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6  # (width,) each
    first.bias -= (first.weight / std) @ mean
    first.weight /= std  # W x + b on standardised x == (W / std) x + (b - (W / std) mean)
    outputs = projector.net(inputs)  # (N, hidden)
    out_mean = outputs.mean(0)  # (hidden,)
    scale = embeddings.float().std() / (outputs - out_mean).std()
    target_mean = embeddings.float().mean(0)  # (hidden,)
    last.weight *= scale
    last.bias.copy_(scale * (last.bias - out_mean) + target_mean)
    after = projector(patches.float()).norm(dim=-1).mean().item()
    return {
        "feature_norm_before": before,
        "feature_norm_after": after,
        "embedding_norm": embeddings.float().norm(dim=-1).mean().item(),
    }
