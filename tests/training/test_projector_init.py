"""Projector calibration: outputs take the embedding table's mean and spread, the first layer
acts on standardised inputs, and a perceiver is refused."""

from __future__ import annotations

import pytest
import torch

from training.projector_init import calibrate_projector
from visualchat.model.projector import Projector, ProjectorConfig


@pytest.mark.parametrize(("kind", "merge"), [("mlp", 2), ("linear", 1)])
def test_calibrated_outputs_have_the_embedding_statistics(kind: str, merge: int) -> None:
    torch.manual_seed(0)
    projector = Projector(ProjectorConfig(type=kind, merge=merge), vision_width=8, hidden=12)
    # Patch tokens with a large shared offset, the failure the calibration exists for.
    patches = 5.0 + 0.3 * torch.randn(64, 16, 8)  # (n, patches, width)
    embeddings = 0.05 * torch.randn(100, 12) + torch.linspace(-0.2, 0.2, 12)  # (vocab, hidden)
    stats = calibrate_projector(projector, patches, embeddings)
    with torch.no_grad():
        out = projector(patches).flatten(0, 1)  # (N, hidden)
    torch.testing.assert_close(out.mean(0), embeddings.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close((out - out.mean(0)).std(), embeddings.std(), atol=1e-4, rtol=1e-3)
    assert stats["feature_norm_after"] == pytest.approx(out.norm(dim=-1).mean().item(), rel=1e-4)


def test_the_first_layer_sees_standardised_inputs() -> None:
    torch.manual_seed(1)
    projector = Projector(ProjectorConfig(type="mlp"), vision_width=6, hidden=10)
    first = projector.net[0]
    weight, bias = first.weight.clone(), first.bias.clone()
    patches = 3.0 + 2.0 * torch.randn(32, 4, 6)
    calibrate_projector(projector, patches, torch.randn(50, 10))
    x = patches.flatten(0, 1)
    standardised = (x - x.mean(0)) / (x.std(0) + 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(first(x), standardised @ weight.T + bias, atol=1e-5, rtol=1e-5)


def test_a_perceiver_is_refused() -> None:
    projector = Projector(ProjectorConfig(type="perceiver", num_latents=2), 8, 16)
    with pytest.raises(ValueError, match="perceiver"):
        calibrate_projector(projector, torch.randn(2, 4, 8), torch.randn(10, 16))
