"""The embedded default's starting point for training: the embedded backbone with a fresh
projector and, optionally, a vision tower pretrained by `training.vision_pretraining`.

Used as `model.init: training.embedded:build_embedded` in training/recipes/embedded.yaml.
"""

from __future__ import annotations

from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from visualchat.model import loading
from visualchat.model.modeling import VisualChatModel


def build_embedded(
    vision_weights: str | None = None, attention: str = "mmca", seed: int = 0
) -> tuple[VisualChatModel, PreTrainedTokenizerBase]:
    backbone, tokenizer = loading.load_backbone(loading.embedded_gguf_path())
    model = loading.build_model(loading.embedded_config(attention), backbone, seed=seed)
    if vision_weights is not None:
        model.vision.load_state_dict(load_file(vision_weights))
    return model, tokenizer
