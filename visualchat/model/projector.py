"""Projectors: vision patch tokens (n, num_patches, vision_width) -> LM embeddings
(n, num_image_tokens, hidden)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

ProjectorType = Literal["linear", "mlp", "perceiver"]


@dataclass
class ProjectorConfig:
    type: ProjectorType = "mlp"  # linear | mlp (2-layer GELU, LLaVA-1.5) | perceiver (Flamingo)
    num_latents: int = 32  # perceiver: image tokens per image, whatever the patch count
    depth: int = 2  # perceiver: cross-attention blocks
    num_heads: int | None = None  # perceiver: None picks hidden // 64 when it divides
    # linear/mlp: concatenate each merge x merge square of patches into one token before
    # projecting (pixel shuffle, as Idefics3/InternVL do): merge**2 fewer image tokens, no
    # information dropped. Needs a square patch grid divisible by merge.
    merge: int = 1
    # > 0: one learned vector per image number (1..image_indices, later numbers share the last)
    # added to every token of that image, zero-initialised so training starts from the plain
    # projector. Without it an image token does not know which image it belongs to: under MMCA
    # it cannot see the "Image k:" text before it, and under causal attention the LM has to
    # learn to carry that text into the image's tokens before "which image ..." can be answered.
    image_indices: int = 0

    def __post_init__(self) -> None:
        if self.type not in ("linear", "mlp", "perceiver"):
            raise ValueError(f"projector type must be linear, mlp or perceiver, got {self.type!r}")
        if self.num_latents < 1 or self.depth < 1:
            raise ValueError("perceiver num_latents and depth must be positive")
        if self.merge < 1:
            raise ValueError(f"merge must be a positive integer, got {self.merge}")
        if self.image_indices < 0:
            raise ValueError(f"image_indices must be >= 0, got {self.image_indices}")
        if self.merge > 1 and self.type == "perceiver":
            raise ValueError("merge applies to linear/mlp projectors; a perceiver sets num_latents")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PerceiverBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.norm_latents = nn.LayerNorm(hidden)
        self.norm_inputs = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
        )

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)  # (n, num_latents, hidden)
        # Flamingo: latents attend to the patches and to themselves.
        kv = torch.cat(
            [self.norm_inputs(inputs), q], dim=1
        )  # (n, num_patches + num_latents, hidden)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(self.norm_ff(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, config: ProjectorConfig, vision_width: int, hidden: int) -> None:
        super().__init__()
        num_heads = config.num_heads or (hidden // 64 if hidden % 64 == 0 else 1)
        if hidden % num_heads:
            raise ValueError(f"perceiver num_heads={num_heads} must divide hidden size {hidden}")
        self.input_proj = nn.Linear(vision_width, hidden)
        self.latents = nn.Parameter(torch.randn(config.num_latents, hidden) * hidden**-0.5)
        self.blocks = nn.ModuleList(PerceiverBlock(hidden, num_heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        inputs = self.input_proj(patches)  # (n, num_patches, hidden)
        latents = self.latents.unsqueeze(0).expand(patches.shape[0], -1, -1)  # (n, L, hidden)
        for block in self.blocks:
            latents = block(latents, inputs)
        return self.norm(latents)


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig, vision_width: int, hidden: int) -> None:
        super().__init__()
        self.config = config
        width = vision_width * config.merge**2
        if config.type == "linear":
            self.net: nn.Module = nn.Linear(width, hidden)
        elif config.type == "mlp":
            self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        else:
            self.net = PerceiverResampler(config, vision_width, hidden)
        # (image_indices, hidden); a bare zero tensor rather than nn.Embedding so that building
        # the model draws no random numbers for it (seeded inits stay as they were).
        self.image_index = (
            nn.Parameter(torch.zeros(config.image_indices, hidden))
            if config.image_indices
            else None
        )

    def num_output_tokens(self, num_patches: int) -> int:
        if self.config.type == "perceiver":
            return self.config.num_latents
        self._check_grid(num_patches)
        return num_patches // self.config.merge**2

    def _check_grid(self, num_patches: int) -> int:
        side = math.isqrt(num_patches)
        merge = self.config.merge
        if merge > 1 and (side * side != num_patches or side % merge):
            raise ValueError(
                f"merge={merge} needs a square patch grid divisible by {merge}, got {num_patches} patches"
            )
        return side

    def merge_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(n, side*side, w) -> (n, (side/m)^2, m*m*w), each m x m square of patches concatenated."""
        merge = self.config.merge
        if merge == 1:
            return patches
        n, num_patches, width = patches.shape
        side = self._check_grid(num_patches)
        grid = patches.reshape(n, side // merge, merge, side // merge, merge, width)
        grid = grid.permute(0, 1, 3, 2, 4, 5)  # (n, rows, cols, m, m, w)
        return grid.reshape(n, (side // merge) ** 2, merge * merge * width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.net(self.merge_patches(patches))  # (n, num_image_tokens, hidden)

    def add_image_index(
        self,
        tokens: torch.Tensor,  # (N, hidden) image tokens as placed in a sequence
        image_numbers: torch.Tensor,  # (N,) long, 1-based number of each token's image
    ) -> torch.Tensor:
        """Add each token's image-number vector. Applied where tokens are placed in a sequence,
        not in forward, because one image's features are cached and reused under different
        numbers (another round, another request)."""
        if self.image_index is None:
            return tokens
        last = self.image_index.shape[0]
        rows = image_numbers.to(tokens.device).clamp(1, last) - 1  # (N,)
        return tokens + self.image_index[rows].to(tokens.dtype)
