"""Two training steps of the real embedded default (SmolLM2-135M + the embedded ViT): the
recipe's `init: embedded`, LoRA on its attention, and a delta over "embedded" that reloads."""

from __future__ import annotations

import json

import pytest
import torch
from training_fixtures import make_record

from training.collator import Collator
from training.config import TrainConfig
from training.trainer import run_training
from visualchat.model import loading
from visualchat.processor import VisualChatProcessor

pytestmark = pytest.mark.slow  # loads and trains the 135M backbone on CPU


def test_embedded_init_trains_and_exports(tmp_path, train_dir) -> None:
    config = TrainConfig.from_dict(
        {
            "model": {"init": "embedded"},
            "data": {"train": str(train_dir), "max_length": 512},
            "stages": [
                {
                    "name": "all",
                    "trainable": ["vision", "projector", "lora"],
                    "steps": 2,
                    "batch_size": 2,
                    "lr": 1e-4,
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                }
            ],
            "run": {"output_dir": str(tmp_path / "out"), "progress": False, "log_every": 1},
        }
    )
    result = run_training(config)
    payload = json.loads((result.final_dir / "visualchat_config.json").read_text())
    assert payload["base_backbone"] == "embedded"
    lora = [n for n, _ in result.model.named_parameters() if ".lora_A." in n]
    assert len(lora) == 4 * result.model.language_model.config.num_hidden_layers
    loaded, tokenizer = loading.load_pretrained(result.final_dir)
    processor = VisualChatProcessor(
        tokenizer, loaded.vision.image_transform(), loaded.num_image_tokens
    )
    batch = Collator(processor, 1000)([make_record(1, multi=True)])
    inputs = (batch.input_ids, batch.token_modality)
    with torch.no_grad():
        expected = result.model.eval()(*inputs, pixel_values=batch.pixel_values).logits
        actual = loaded(*inputs, pixel_values=batch.pixel_values).logits
    torch.testing.assert_close(actual, expected, atol=2e-3, rtol=2e-3)


def test_the_embedded_factory_sets_the_default_system_prompt() -> None:
    from training.embedded import build_embedded

    model, _ = build_embedded(calibration_images=0, default_system="")
    assert model.config.default_system == ""
    model, _ = build_embedded(calibration_images=0)
    assert model.config.default_system is None  # the template's own prompt
