"""Weights made exactly as llama.cpp's block formats make them, for the block-kernel tests: what
transformers' GGUF loader would hand the engine for a Q4_1 or Q8_0 file."""

from __future__ import annotations

import torch
from torch import nn

from visualchat.model.delta import MergedLora


def q4_1_values(weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q4_1 of `weight` (blocks of 32 along a row: float16 d and m = the block's
    minimum, q = round((w - m) / d) in 0..15), dequantized to float32 as gguf's numpy does."""
    n, k = weight.shape
    x = weight.reshape(n, k // 32, 32)
    m = x.amin(-1, keepdim=True).half().float()
    d = ((x.amax(-1, keepdim=True) - m) / 15).half().float()
    q = torch.where(d > 0, ((x - m) / d).round(), torch.zeros_like(x)).clamp(0, 15)
    return (q * d + m).reshape(n, k)


def q8_0_values(weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_0 (float16 d = max|w| / 127, q = round(w / d)), dequantized."""
    n, k = weight.shape
    x = weight.reshape(n, k // 32, 32)
    d = (x.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, (x / d).round(), torch.zeros_like(x)).clamp(-128, 127)
    return (q * d).reshape(n, k)


def make_gguf_like(language_model: nn.Module, lora_rank: int = 0, seed: int = 0) -> None:
    """In place: every linear weight of the backbone becomes its Q4_1 values and the output layer
    (tied or not) its Q8_0 values, as loading SmolLM2's Q4_1 GGUF gives. With lora_rank > 0,
    random LoRA factors are then merged into the attention and MLP layers the way peft merges
    them, and recorded as `merged_lora`, as loading a delta checkpoint does."""
    generator = torch.Generator().manual_seed(seed)
    head = language_model.get_output_embeddings()
    with torch.no_grad():
        for name, layer in language_model.named_modules():
            if type(layer) is not nn.Linear:
                continue
            values = q8_0_values if layer is head else q4_1_values
            layer.weight.copy_(values(layer.weight))
            if lora_rank and name.split(".")[-1].endswith("_proj"):
                lora = MergedLora(
                    a=0.1 * torch.randn(lora_rank, layer.in_features, generator=generator),
                    b=0.1 * torch.randn(layer.out_features, lora_rank, generator=generator),
                    scale=2.0,
                )
                layer.weight += lora.delta()  # peft's merge: weight.data += delta
                layer.merged_lora = lora
