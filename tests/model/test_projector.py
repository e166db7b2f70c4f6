"""Projectors: shapes and token counts of linear, mlp and perceiver."""

from __future__ import annotations

import pytest
import torch
from factories import make_model

from visualchat.model.projector import Projector, ProjectorConfig


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_linear_and_mlp_keep_one_token_per_patch(kind: str) -> None:
    projector = Projector(ProjectorConfig(type=kind), vision_width=24, hidden=40)
    assert projector.num_output_tokens(16) == 16
    assert projector.num_output_tokens(49) == 49
    out = projector(torch.randn(3, 16, 24))
    assert out.shape == (3, 16, 40)


def test_linear_is_one_affine_map_and_mlp_is_two_layers() -> None:
    linear = Projector(ProjectorConfig(type="linear"), 24, 40)
    assert isinstance(linear.net, torch.nn.Linear)
    patches = torch.randn(2, 5, 24)
    torch.testing.assert_close(linear(patches), patches @ linear.net.weight.T + linear.net.bias)
    mlp = Projector(ProjectorConfig(type="mlp"), 24, 40)
    first, act, second = mlp.net
    expected = second(torch.nn.functional.gelu(first(patches)))
    torch.testing.assert_close(mlp(patches), expected)
    assert isinstance(act, torch.nn.GELU)


@pytest.mark.parametrize("num_patches", [1, 16, 49])
def test_perceiver_gives_num_latents_tokens_whatever_the_patch_count(num_patches: int) -> None:
    config = ProjectorConfig(type="perceiver", num_latents=6, depth=2)
    projector = Projector(config, vision_width=24, hidden=64).eval()
    assert projector.num_output_tokens(num_patches) == 6
    with torch.no_grad():
        out = projector(torch.randn(2, num_patches, 24))
    assert out.shape == (2, 6, 64)
    assert torch.isfinite(out).all()
    assert len(projector.net.blocks) == 2
    assert projector.net.blocks[0].attn.num_heads == 1  # 64 // 64


def test_perceiver_outputs_depend_on_the_image() -> None:
    projector = Projector(ProjectorConfig(type="perceiver", num_latents=3), 8, 32).eval()
    with torch.no_grad():
        a, b = projector(torch.randn(2, 4, 8))
    assert (a - b).abs().max() > 1e-4


def test_perceiver_heads_must_divide_hidden() -> None:
    with pytest.raises(ValueError, match=r"perceiver num_heads=3 must divide hidden size 32"):
        Projector(ProjectorConfig(type="perceiver", num_heads=3), 8, 32)


def test_invalid_projector_type_raises() -> None:
    with pytest.raises(
        ValueError, match=r"projector type must be linear, mlp or perceiver, got 'qformer'"
    ):
        ProjectorConfig(type="qformer")  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["num_latents", "depth"])
def test_perceiver_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match="perceiver num_latents and depth must be positive"):
        ProjectorConfig(type="perceiver", **{field: 0})


@pytest.mark.parametrize(("kind", "num_tokens"), [("linear", 16), ("mlp", 16), ("perceiver", 4)])
def test_model_image_tokens_follow_the_projector(kind: str, num_tokens: int) -> None:
    model, _ = make_model(projector=kind)
    assert model.num_image_tokens == num_tokens
    with torch.no_grad():
        features = model.encode_images(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, num_tokens, 32)


def test_merge_concatenates_each_square_of_patches_in_grid_order() -> None:
    from visualchat.model.projector import Projector, ProjectorConfig

    projector = Projector(ProjectorConfig(type="linear", merge=2), vision_width=1, hidden=4)
    patches = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid numbered row-major
    merged = projector.merge_patches(patches)  # (1, 4, 4)
    assert merged.shape == (1, 4, 4)
    assert merged[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert projector.num_output_tokens(16) == 4
    assert projector(patches).shape == (1, 4, 4)


def test_merge_rejects_grids_it_cannot_tile() -> None:
    import pytest

    from visualchat.model.projector import Projector, ProjectorConfig

    projector = Projector(ProjectorConfig(type="mlp", merge=3), vision_width=2, hidden=4)
    with pytest.raises(ValueError, match="square patch grid divisible by 3"):
        projector.num_output_tokens(16)
    with pytest.raises(ValueError, match="merge applies to linear/mlp"):
        ProjectorConfig(type="perceiver", merge=2)


def test_image_number_vectors_start_at_zero_and_are_added_by_number() -> None:
    assert Projector(ProjectorConfig(), 8, 32).image_index is None
    plain = Projector(ProjectorConfig(), 8, 32)
    tokens = torch.randn(5, 32)
    assert torch.equal(plain.add_image_index(tokens, torch.tensor([1, 1, 2, 3, 9])), tokens)

    torch.manual_seed(0)
    Projector(ProjectorConfig(), 8, 32)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    projector = Projector(ProjectorConfig(image_indices=3), 8, 32)
    assert torch.equal(torch.rand(3), after_plain)  # the vectors drew no random numbers
    assert projector.image_index.shape == (3, 32)
    assert not projector.image_index.any()  # training starts from the plain projector
    assert torch.equal(projector.add_image_index(tokens, torch.tensor([1, 2, 3, 3, 1])), tokens)

    with torch.no_grad():
        projector.image_index.copy_(torch.arange(3.0).unsqueeze(1) * torch.ones(3, 32))
    numbers = torch.tensor([1, 2, 3, 7, 1])  # 7: past the table, shares the last vector
    out = projector.add_image_index(tokens, numbers)
    torch.testing.assert_close(
        out - tokens, torch.tensor([0.0, 1, 2, 2, 0]).unsqueeze(1).expand(5, 32)
    )


def test_image_number_vectors_are_trained_and_saved_with_the_projector() -> None:
    projector = Projector(ProjectorConfig(image_indices=2), 8, 32)
    assert "image_index" in projector.state_dict()
    tokens = projector(torch.randn(2, 4, 8)).reshape(-1, 32)  # (8, hidden)
    numbers = torch.tensor([1] * 4 + [2] * 4)
    projector.add_image_index(tokens, numbers).pow(2).sum().backward()
    assert projector.image_index.grad is not None and projector.image_index.grad.abs().min() > 0


def test_negative_image_indices_are_refused() -> None:
    with pytest.raises(ValueError, match=r"image_indices must be >= 0, got -1"):
        ProjectorConfig(image_indices=-1)
