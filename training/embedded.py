"""The embedded default's starting point for training: the embedded backbone with a fresh
projector and, optionally, a vision tower pretrained by `training.vision_pretraining`.

Used as `model.init: training.embedded:build_embedded` in training/recipes/embedded.yaml.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Collection

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from visualchat.model import loading
from visualchat.model.modeling import VisualChatModel

logger = logging.getLogger(__name__)


def build_embedded(
    vision_weights: str | None = None,
    attention: str = "mmca",
    seed: int = 0,
    calibration_images: int = 256,
    align_steps: int = 0,
    image_indices: int = 0,
    default_system: str | None = None,
    restoring: Collection[str] = (),
) -> tuple[VisualChatModel, PreTrainedTokenizerBase]:
    """calibration_images > 0: initialise the projector from that many synthetic training
    scenes (training.projector_init); 0 keeps the plain random initialisation.
    align_steps > 0: then align the projector to the LM's word embeddings for that many steps
    (training.projector_alignment); needs the pretrained `vision_weights` to mean anything.
    image_indices > 0: the projector adds a learned vector per image number (ProjectorConfig;
    tried on the embedded default and not kept, see README).
    default_system: the system prompt the model is trained with and later prompted with when a
    conversation has none (VisualChatConfig.default_system; "" is an empty system turn).
    restoring: groups a checkpoint will overwrite (training.model_init.init_model): their
    initialisation is skipped (the tower's weights file, the projector's calibration and
    alignment)."""
    backbone, tokenizer = loading.load_backbone(loading.embedded_gguf_path())
    config = loading.embedded_config(attention)
    config.projector = dataclasses.replace(config.projector, image_indices=image_indices)
    config.default_system = default_system
    model = loading.build_model(config, backbone, seed=seed)
    if vision_weights is not None and "vision" not in restoring:
        model.vision.load_state_dict(load_file(vision_weights))
    if "projector" in restoring:
        logger.info("projector restored from a checkpoint: calibration and alignment skipped")
        return model, tokenizer
    if calibration_images > 0:
        _calibrate(model, calibration_images, seed)
    if align_steps > 0:
        from training.projector_alignment import AlignConfig, align_projector

        align_projector(model, tokenizer, AlignConfig(steps=align_steps, seed=seed))
    return model, tokenizer


def _calibrate(model: VisualChatModel, num_images: int, seed: int) -> None:
    from data_blend.sources.scenes import generate_scene, render
    from training.projector_init import calibrate_projector

    rng = random.Random(seed)
    transform = model.vision.image_transform()
    size = model.vision.image_size[0]
    pixels = torch.stack(
        [transform(render(generate_scene(rng, size, "train"))) for _ in range(num_images)]
    )  # (n, 3, H, W)
    with torch.no_grad():
        patches = model.vision(pixels)  # (n, patches, width)
    stats = calibrate_projector(
        model.projector, patches, model.language_model.get_input_embeddings().weight
    )
    logger.info("projector calibrated on %d training scenes: %s", num_images, stats)
