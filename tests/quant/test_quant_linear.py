"""QuantLinear: same math as the dequantized weight, dtype handling, LoRC, the Triton kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visualchat.quant import FORMAT_NAMES, QuantLinear, lorc_factors, quantize_tensor, sqnr_db


def make_linear(in_features: int = 300, out_features: int = 24, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.2, 3.0, out_features)[:, None])  # rows of mixed range
    return linear


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("bias", [True, False])
def test_output_is_exactly_the_dequantized_weight_matmul(fmt: str, bias: bool) -> None:
    linear = make_linear(bias=bias)
    layer = QuantLinear.from_linear(linear, fmt)
    x = torch.randn(2, 5, 300)  # (batch, seq, in)
    weight = quantize_tensor(linear.weight, fmt).dequantize()
    expected = F.linear(x, weight, linear.bias)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.dequantize_weight(), weight)
    layer.keep_dequantized = True
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x), expected)  # from the kept weight
    assert not torch.equal(weight, linear.weight.detach())  # it did quantize


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("shape", [(3, 5), (2, 3), (4, 6), (8, 16)])
def test_every_packing_path_decodes_the_same_weight(fmt: str, shape: tuple[int, int]) -> None:
    """Odd sizes take the unpack-then-lookup path, even ones the pair-table path."""
    linear = make_linear(in_features=shape[1], out_features=shape[0], seed=shape[0])
    layer = QuantLinear.from_linear(linear, fmt)
    assert torch.equal(layer.dequantize_weight(), quantize_tensor(linear.weight, fmt).dequantize())


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_sqnr_orders_the_formats_by_bits(fmt: str) -> None:
    linear = make_linear(in_features=256, out_features=64)
    error = sqnr_db(linear.weight, QuantLinear.from_linear(linear, fmt).dequantize_weight())
    floor = {"int8": 35, "fp6_e3m2": 20, "int4": 15, "fp5_e2m2": 15, "fp4_e2m1": 10}[fmt]
    assert error > floor


def test_bfloat16_model_keeps_float32_scales_and_matches_the_same_math() -> None:
    linear = make_linear()
    layer = QuantLinear.from_linear(linear, "fp6_e3m2", lorc_rank=4)
    scales = layer.scales.clone()
    layer = layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales)
    assert layer.lorc_u.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.codes_low.dtype == torch.uint8
    x = torch.randn(3, 300, dtype=torch.bfloat16)
    weight = quantize_tensor(linear.weight, "fp6_e3m2").dequantize(torch.bfloat16)
    expected = F.linear(x, weight, layer.bias) + F.linear(F.linear(x, layer.lorc_v), layer.lorc_u)
    assert torch.equal(layer(x), expected)


def test_state_dict_round_trip_into_an_empty_layer() -> None:
    source = QuantLinear.from_linear(make_linear(), "int4", lorc_rank=3)
    target = QuantLinear(300, 24, "int4", lorc_rank=3)
    target.keep_dequantized = True
    x = torch.randn(4, 300)
    target(x)  # a kept weight from before the load must not survive it
    target.load_state_dict(source.state_dict())
    assert set(source.state_dict()) == {
        "codes_low", "scales", "zeros", "lorc_u", "lorc_v", "bias",
    }  # fmt: skip
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp6_e3m2", "int4"])
def test_lorc_reduces_the_error_more_with_more_rank(fmt: str) -> None:
    linear = make_linear(in_features=96, out_features=48)
    weight = linear.weight.detach()
    plain = QuantLinear.from_linear(linear, fmt)
    errors = [float((weight - plain.effective_weight()).norm())]
    for rank in (2, 8):
        layer = QuantLinear.from_linear(linear, fmt, lorc_rank=rank)
        assert layer.lorc_u.shape == (48, rank) and layer.lorc_v.shape == (rank, 96)
        errors.append(float((weight - layer.effective_weight()).norm()))
    assert errors[0] > errors[1] > errors[2]
    # Full rank corrects the error completely (up to float32 rounding).
    full = QuantLinear.from_linear(linear, fmt, lorc_rank=48)
    assert float((weight - full.effective_weight()).norm()) < 1e-4 * errors[0]
    # ... and the layer's outputs move towards the original layer's.
    x = torch.randn(16, 96)
    with torch.no_grad():
        target = linear(x)
        output_errors = [
            float((QuantLinear.from_linear(linear, fmt, lorc_rank=r)(x) - target).norm())
            for r in (0, 8)
        ]
    assert output_errors[1] < output_errors[0]


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_lorc_factors_are_the_truncated_svd(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    error = torch.randn(*shape)
    u, v = lorc_factors(error, 3)
    assert u.shape == (shape[0], 3) and v.shape == (3, shape[1])
    left, singular, right = torch.linalg.svd(error, full_matrices=False)
    best = left[:, :3] @ torch.diag(singular[:3]) @ right[:3]
    assert torch.allclose(u @ v, best, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        lorc_factors(error, 0)


def test_lorc_rank_is_capped_by_the_layer_size() -> None:
    layer = QuantLinear.from_linear(make_linear(in_features=6, out_features=4), "int8", lorc_rank=8)
    assert layer.lorc_rank == 4 and layer.lorc_rank_requested == 8


# --- the fused Triton kernel ------------------------------------------------------------------


def _kernel_case(fmt: str, in_features: int, out_features: int, num_rows: int, seed: int):
    layer = QuantLinear.from_linear(make_linear(in_features, out_features, seed=seed), fmt)
    x = torch.randn(num_rows, in_features)
    expected = F.linear(x, layer.dequantize_weight(torch.float32))
    return layer, x, expected


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_triton_kernel_under_the_cpu_interpreter(fmt: str) -> None:
    import triton  # noqa: F401  (ships with torch; fail loudly if missing)

    from visualchat.quant.kernel import quant_matmul

    # Shapes off the block sizes: masked rows, columns and K tail; int4 with 3 groups.
    layer, x, expected = _kernel_case(fmt, in_features=300, out_features=40, num_rows=5, seed=1)
    y = quant_matmul(
        x,
        layer.codes_low,
        layer.codes_high,
        layer.scales,
        layer.zeros,
        fmt,
        layer.out_features,
        interpret=True,
        block_sizes=(16, 32, 64),
    )
    assert y.shape == (5, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_the_gpu(fmt: str, dtype: torch.dtype) -> None:
    layer, x, _ = _kernel_case(fmt, in_features=576, out_features=192, num_rows=37, seed=2)
    layer = layer.to("cuda", dtype)
    x = x.to("cuda", dtype)
    expected = F.linear(x.float(), layer.dequantize_weight(torch.float32).to(dtype).float())
    expected = (expected + layer.bias.float()).to(dtype)
    y = layer(x)  # CUDA input: the fused kernel
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, expected, rtol=tolerance, atol=tolerance)
    layer.keep_dequantized = True  # the dequantize + matmul path on the same device
    torch.testing.assert_close(layer(x), expected, rtol=tolerance, atol=tolerance)
