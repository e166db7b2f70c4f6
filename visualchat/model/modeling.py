"""VisualChatModel: vision tower -> projector -> any transformers causal LM, read with MMCA.

The whole forward lives here and patches nothing: image tokens are spliced into the input
embeddings at the positions tagged as image tokens, and MMCA reaches the backbone through
transformers' attention-function registry (see `attention.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from visualchat.model.attention import MMCA_ATTENTION, register_mmca
from visualchat.model.projector import Projector, ProjectorConfig
from visualchat.model.vision import VisionConfig, VisionTower

logger = logging.getLogger(__name__)

AttentionKind = Literal["mmca", "causal"]


@dataclass
class VisualChatConfig:
    vision: VisionConfig
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    attention: AttentionKind = "mmca"  # "causal" is the plain LLaVA path
    image_token_id: int = 0  # id written at image positions (never embedded; any valid id)
    # System prompt used when a conversation brings none; None keeps the chat template's own
    # default (SmolLM2's is 16 tokens of every prompt, "You are a helpful AI assistant named
    # SmolLM, ..."). Part of the model: it was trained with exactly this prompt.
    default_system: str | None = None

    def __post_init__(self) -> None:
        if self.default_system is not None and not isinstance(self.default_system, str):
            raise ValueError(
                f"default_system must be a string or None, got {self.default_system!r}"
            )
        if self.attention not in ("mmca", "causal"):
            raise ValueError(f"attention must be 'mmca' or 'causal', got {self.attention!r}")
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.projector, dict):
            self.projector = ProjectorConfig(**self.projector)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vision": self.vision.to_dict(),
            "projector": self.projector.to_dict(),
            "attention": self.attention,
            "image_token_id": self.image_token_id,
            "default_system": self.default_system,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisualChatConfig:
        vision = dict(data["vision"])
        for key in ("mean", "std"):
            if key in vision:
                vision[key] = tuple(vision[key])
        return cls(
            vision=VisionConfig(**vision),
            projector=ProjectorConfig(**data.get("projector", {})),
            attention=data.get("attention", "mmca"),
            image_token_id=data.get("image_token_id", 0),
            default_system=data.get("default_system"),
        )


class VisualChatModel(nn.Module):
    def __init__(
        self,
        config: VisualChatConfig,
        language_model: PreTrainedModel,
        vision: VisionTower | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.language_model = language_model
        self.vision = vision if vision is not None else VisionTower(config.vision)
        self.hidden_size = language_model.get_input_embeddings().embedding_dim
        self.projector = Projector(config.projector, self.vision.hidden_size, self.hidden_size)
        self.num_image_tokens = self.projector.num_output_tokens(self.vision.num_patches)
        self.set_attention(config.attention)

    def set_attention(self, attention: AttentionKind) -> None:
        if attention == "mmca":
            register_mmca()
            self.language_model.set_attn_implementation(MMCA_ATTENTION)
        elif attention == "causal":
            self.language_model.set_attn_implementation("sdpa")
        else:
            raise ValueError(f"attention must be 'mmca' or 'causal', got {attention!r}")
        self.config.attention = attention

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, 3, H, W) -> (num_images, num_image_tokens, hidden)."""
        vision_dtype = next(self.vision.parameters()).dtype
        patches = self.vision(pixel_values.to(self.device, vision_dtype))  # (n, patches, width)
        return self.projector(patches.to(next(self.projector.parameters()).dtype)).to(self.dtype)

    def embed(
        self,
        input_ids: torch.Tensor,  # (batch, seq)
        image_modality: torch.Tensor,  # (batch, seq) tags of these positions; > 0 = image
        image_features: torch.Tensor | None,  # (n, num_image_tokens, hidden) or (N, hidden)
    ) -> torch.Tensor:
        """Text embeddings with the image positions (row-major order) replaced by features."""
        is_image = image_modality > 0  # (batch, seq)
        # Image positions hold a placeholder id; embed a safe id there, then overwrite.
        safe_ids = input_ids.masked_fill(is_image, self.config.image_token_id)
        embeds = self.language_model.get_input_embeddings()(safe_ids)  # (batch, seq, hidden)
        num_positions = int(is_image.sum())
        num_features = 0 if image_features is None else image_features.numel() // self.hidden_size
        if num_positions != num_features:
            raise ValueError(
                f"{num_positions} image positions in the input but {num_features} image feature "
                f"vectors were given ({self.num_image_tokens} per image)"
            )
        if num_positions:
            flat = image_features.reshape(-1, self.hidden_size).to(embeds.dtype)  # (N, hidden)
            flat = self.projector.add_image_index(flat, image_modality[is_image])
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), flat)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,  # (batch, seq) new tokens
        token_modality: torch.Tensor,  # (batch, past + seq) tags: 0 text, k image k, -1 pad
        pixel_values: torch.Tensor | None = None,  # (num_images, 3, H, W) of this input's images
        image_features: torch.Tensor | None = None,  # or their features, precomputed/cached
        attention_mask: torch.Tensor | None = None,  # (batch, past + seq) 1 = real token
        position_ids: torch.Tensor | None = None,  # (batch, seq)
        past_key_values: Any = None,
        labels: torch.Tensor | None = None,  # (batch, seq) -100 = not trained
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,  # int: last n; (batch, seq) bool: those
    ) -> CausalLMOutputWithPast:
        seq_len = input_ids.shape[1]
        if token_modality.shape[0] != input_ids.shape[0] or token_modality.shape[1] < seq_len:
            raise ValueError(
                f"token_modality {tuple(token_modality.shape)} must cover the input "
                f"{tuple(input_ids.shape)} (and any cached positions before it)"
            )
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        token_modality = token_modality.to(input_ids.device)
        inputs_embeds = self.embed(input_ids, token_modality[:, -seq_len:], image_features)
        extra: dict[str, Any] = {}
        if self.config.attention == "mmca":
            extra["token_modality"] = token_modality
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **extra,
        )
