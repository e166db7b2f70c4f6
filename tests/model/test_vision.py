"""Vision towers: custom and named open_clip ViTs, refusals, HF CLIP / SigLIP from a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import NUM_PATCHES, VISION_CONFIG, VISION_WIDTH, make_image
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from visualchat.model.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionConfig, VisionTower


def test_custom_open_clip_vit_gives_patch_tokens() -> None:
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(custom=dict(VISION_CONFIG))).eval()
    assert tower.kind == "open_clip"
    assert tower.image_size == (32, 32)
    assert tower.num_patches == NUM_PATCHES == 16
    assert tower.hidden_size == VISION_WIDTH == 32
    with torch.no_grad():
        tokens = tower(torch.randn(3, 3, 32, 32))
    assert tokens.shape == (3, 16, 32)
    assert torch.isfinite(tokens).all()


def test_image_transform_resizes_and_normalises() -> None:
    tower = VisionTower(VisionConfig(custom=dict(VISION_CONFIG)))
    pixels = tower.image_transform()(make_image((255, 0, 0), size=(40, 30)))
    assert pixels.shape == (3, 32, 32)
    # The bottom-right of the image is pure red: (1 - mean) / std, (0 - mean) / std, ...
    expected = torch.tensor(
        [(1 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0]]
        + [(0 - m) / s for m, s in zip(OPENAI_CLIP_MEAN[1:], OPENAI_CLIP_STD[1:], strict=True)]
    )
    torch.testing.assert_close(pixels[:, -1, -1], expected, atol=1e-5, rtol=1e-5)


def test_registered_open_clip_name_builds_without_weights() -> None:
    tower = VisionTower(VisionConfig(model_name="ViT-S-32-alt"))
    assert tower.kind == "open_clip"
    assert tower.image_size == (224, 224)
    assert tower.num_patches == 49  # (224 / 32) ** 2
    assert tower.hidden_size == 384
    assert tower.visual.output_tokens is True
    with torch.no_grad():
        tokens = tower(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 49, 384)


def test_non_vit_open_clip_tower_is_refused() -> None:
    resnet = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}
    with pytest.raises(
        ValueError,
        match=r"vision tower custom is a ModifiedResNet; VisualChat needs patch tokens",
    ):
        VisionTower(VisionConfig(custom=resnet))


def test_missing_pretrained_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(ValueError, match=r"open_clip weights file not found: .*nope\.bin"):
        VisionConfig(model_name="ViT-S-32-alt", pretrained=str(missing))
    with pytest.raises(ValueError, match=r"pretrained= is a weights file for an open_clip"):
        VisionConfig(custom=dict(VISION_CONFIG), pretrained=str(missing))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"model_name": "ViT-S-32", "custom": {"image_size": 32}}],
    ids=["none", "two"],
)
def test_vision_config_needs_exactly_one_source(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"VisionConfig needs exactly one of model_name, custom"):
        VisionConfig(**kwargs)


def _tiny_clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )


def test_hf_clip_vision_from_a_local_folder_drops_cls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip = CLIPVisionModel(_tiny_clip_vision_config()).eval()
    clip.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]})
    )
    tower = VisionTower(VisionConfig(hf_path=str(tmp_path)))
    assert tower.kind == "hf"
    assert tower.num_patches == 16
    assert tower.hidden_size == 32
    assert tower.image_size == (32, 32)
    assert tower.config.mean == (0.5, 0.4, 0.3)
    assert tower.config.std == (0.2, 0.25, 0.3)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = tower(pixels)
        hidden = clip(pixel_values=pixels).last_hidden_state  # (2, 1 + 16, 32)
    assert hidden.shape == (2, 17, 32)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, hidden[:, 1:], atol=1e-6, rtol=0)


def test_hf_full_clip_model_folder_reads_its_vision_half(tmp_path: Path) -> None:
    torch.manual_seed(0)
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = _tiny_clip_vision_config().to_dict()
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path)
    tower = VisionTower(VisionConfig(hf_path=str(tmp_path)))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
        torch.testing.assert_close(tower(pixels), expected, atol=1e-6, rtol=0)


def test_hf_siglip_vision_keeps_every_token(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    siglip = SiglipVisionModel(config).eval()
    siglip.save_pretrained(tmp_path)
    tower = VisionTower(VisionConfig(hf_path=str(tmp_path)))
    assert tower.num_patches == 16
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = tower(pixels)
        expected = siglip(pixel_values=pixels).last_hidden_state
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, expected, atol=1e-6, rtol=0)
    # No preprocessor_config.json: the OpenAI CLIP defaults stay.
    assert tower.config.mean == OPENAI_CLIP_MEAN


def test_unsupported_hf_model_type_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported HF vision model type 'llama'"):
        VisionTower(VisionConfig(hf_path=str(tmp_path)))
