"""Vision towers that return patch tokens: open_clip ViTs (named, custom, local weights) and
HF CLIP/SigLIP vision models from a local folder."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision import transforms

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """Exactly one of `model_name`, `custom` or `hf_path` names the tower."""

    model_name: str | None = None  # an open_clip registered name, e.g. "ViT-B-16"
    pretrained: str | None = None  # local open_clip weights file for model_name (no hub tags)
    custom: dict[str, Any] | None = None  # open_clip CLIPVisionCfg fields of a custom ViT
    hf_path: str | None = None  # local folder of an HF CLIP or SigLIP (vision) model
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN  # pixel normalisation (overridden by hf_path)
    std: tuple[float, ...] = OPENAI_CLIP_STD
    extra: dict[str, Any] = field(default_factory=dict)  # reserved for forward-compatible fields

    def __post_init__(self) -> None:
        named = [k for k in ("model_name", "custom", "hf_path") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError(
                "VisionConfig needs exactly one of model_name, custom or hf_path, got "
                f"{named or 'none'}"
            )
        if self.pretrained is not None and self.model_name is None:
            raise ValueError("pretrained= is a weights file for an open_clip model_name")
        if self.pretrained is not None and not os.path.isfile(self.pretrained):
            raise ValueError(
                f"open_clip weights file not found: {self.pretrained!r} (VisualChat never "
                "downloads weights; pass a local file)"
            )
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VisionTower(nn.Module):
    """pixel_values (num_images, 3, H, W) -> patch tokens (num_images, num_patches, width)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        if config.hf_path is not None:
            self._init_hf(config.hf_path)
        else:
            self._init_open_clip(config)

    def _init_open_clip(self, config: VisionConfig) -> None:
        import open_clip
        from open_clip.transformer import VisionTransformer

        if config.custom is not None:
            # open_clip has no public vision-only constructor for a custom config; its tower
            # builder is stable across the pinned release and avoids building a text tower.
            from open_clip.model import _build_vision_tower

            cfg = dict(config.custom)
            embed_dim = int(cfg.pop("embed_dim", cfg.get("width", 256)))
            visual = _build_vision_tower(embed_dim, cfg)
        else:
            clip = open_clip.create_model(
                config.model_name,
                pretrained=config.pretrained,
                load_weights=config.pretrained is not None,
                pretrained_text=False,
            )
            visual = clip.visual
            preprocess = getattr(visual, "preprocess_cfg", None) or {}
            if "mean" in preprocess:
                config.mean, config.std = tuple(preprocess["mean"]), tuple(preprocess["std"])
            del clip  # drop the text tower
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"vision tower {config.model_name or 'custom'} is a {type(visual).__name__}; "
                "VisualChat needs patch tokens, which only open_clip ViTs expose"
            )
        visual.output_tokens = True
        self.visual = visual
        self.kind = "open_clip"
        size = visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        grid = visual.grid_size
        self.num_patches = int(grid[0] * grid[1])
        self.hidden_size = int(visual.conv1.out_channels)

    def _init_hf(self, path: str) -> None:
        from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

        hf_config = AutoConfig.from_pretrained(path)
        model_type = hf_config.model_type
        if model_type in ("clip", "clip_vision_model"):
            self.visual = CLIPVisionModel.from_pretrained(path)
            self.drop_cls = True
        elif model_type in ("siglip", "siglip_vision_model"):
            self.visual = SiglipVisionModel.from_pretrained(path)
            self.drop_cls = False
        else:
            raise ValueError(f"{path}: unsupported HF vision model type {model_type!r}")
        vcfg = self.visual.config
        self.kind = "hf"
        self.image_size = (vcfg.image_size, vcfg.image_size)
        self.num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
        self.hidden_size = vcfg.hidden_size
        self._read_hf_normalisation(path)

    def _read_hf_normalisation(self, path: str) -> None:
        import json

        preprocessor = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(preprocessor):
            with open(preprocessor) as f:
                cfg = json.load(f)
            if "image_mean" in cfg:
                self.config.mean = tuple(cfg["image_mean"])
                self.config.std = tuple(cfg["image_std"])

    def image_transform(self) -> transforms.Compose:
        """PIL RGB image -> (3, H, W) float tensor, as the tower expects at inference."""
        return transforms.Compose(
            [
                transforms.Resize(
                    self.image_size, interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.ToTensor(),
                transforms.Normalize(self.config.mean, self.config.std),
            ]
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "open_clip":
            _, tokens = self.visual(pixel_values)  # (n, num_patches, width)
            return tokens
        hidden = self.visual(pixel_values=pixel_values).last_hidden_state  # (n, [1+]patches, width)
        return hidden[:, 1:] if self.drop_cls else hidden
