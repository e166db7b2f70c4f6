"""Codes of every format against an independent reference.

The float reference enumerates every code of a format, decodes it by the OCP definition with
exact fractions, and picks for each input the nearest value, ties to the code whose mantissa
LSB is 0 -- no frexp, no rounding arithmetic, nothing shared with the library. Inputs cover
every representable value, every exact midpoint (ties), one float32 ulp either side of them,
signed zeros, subnormals and their halves, and values past the maximum (saturation).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from visualchat.quant import FORMATS, encode_float, quantize_tensor
from visualchat.quant.formats import get_format

FLOATS = {  # name: (exponent bits, mantissa bits, bias, max normal, min subnormal)
    "fp6_e3m2": (3, 2, 3, 28.0, 0.0625),
    "fp5_e2m2": (2, 2, 1, 7.0, 0.25),
    "fp4_e2m1": (2, 1, 1, 6.0, 0.5),
}


def ocp_value(code: int, exponent_bits: int, mantissa_bits: int, bias: int) -> Fraction:
    """The value of a code by the OCP MX definition (no inf/nan), as an exact fraction."""
    sign = -1 if code >> (exponent_bits + mantissa_bits) else 1
    exponent = (code >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = code & ((1 << mantissa_bits) - 1)
    if exponent == 0:
        magnitude = Fraction(mantissa, 1 << mantissa_bits) * Fraction(2) ** (1 - bias)
    else:
        magnitude = (1 + Fraction(mantissa, 1 << mantissa_bits)) * Fraction(2) ** (exponent - bias)
    return sign * magnitude


def magnitudes(fmt: str) -> list[tuple[Fraction, int]]:
    exponent_bits, mantissa_bits, bias, _, _ = FLOATS[fmt]
    return [
        (ocp_value(code, exponent_bits, mantissa_bits, bias), code)
        for code in range(1 << (exponent_bits + mantissa_bits))
    ]


def reference_codes(values: np.ndarray, fmt: str) -> np.ndarray:
    """Nearest representable value, ties to the even code, saturating; sign kept."""
    exponent_bits, mantissa_bits, _, _, _ = FLOATS[fmt]
    table = magnitudes(fmt)
    largest = max(table)
    sign_bit = 1 << (exponent_bits + mantissa_bits)
    out = []
    for x in values.astype(np.float32).tolist():
        sign = sign_bit if math.copysign(1.0, x) < 0 else 0
        if math.isinf(x):
            out.append(sign | largest[1])
            continue
        magnitude = Fraction(abs(x))
        _, _, code = min((abs(v - magnitude), code & 1, code) for v, code in table)
        out.append(sign | code)
    return np.array(out, dtype=np.uint8)


def edge_values(fmt: str) -> tuple[np.ndarray, int]:
    """(inputs, number of exact ties among them)."""
    table = sorted(v for v, _ in magnitudes(fmt))
    max_normal = float(table[-1])
    points = [float(v) for v in table]
    midpoints = [float((a + b) / 2) for a, b in zip(table, table[1:], strict=False)]
    near = []
    for m in midpoints:
        near += [
            np.nextafter(np.float32(m), np.float32(0)),
            np.nextafter(np.float32(m), np.float32(99)),
        ]
    smallest = float(table[1])
    special = [
        0.0,
        -0.0,
        smallest / 2,  # tie between 0 and the smallest subnormal: to 0 (even)
        smallest / 4,
        smallest * 0.75,
        1e-30,
        -1e-30,
        float(np.finfo(np.float32).smallest_subnormal),
        max_normal * 1.0001,
        max_normal * 1.5,
        max_normal * 100,
        1e30,
        math.inf,
    ]
    positive = np.array(points + midpoints + near + special, dtype=np.float32)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(400) * max_normal / 3).astype(np.float32)
    values = np.concatenate([positive, -positive, noise])
    return values, 2 * len(midpoints)


@pytest.mark.parametrize("fmt", list(FLOATS))
def test_float_format_constants_and_value_table(fmt: str) -> None:
    exponent_bits, mantissa_bits, bias, max_normal, min_subnormal = FLOATS[fmt]
    spec = FORMATS[fmt]
    assert (spec.exponent_bits, spec.mantissa_bits, spec.bias) == (
        exponent_bits,
        mantissa_bits,
        bias,
    )
    assert spec.max_normal == max_normal
    table = spec.code_values()
    assert table.shape == (1 << spec.num_bits,)
    expected = [float(ocp_value(c, exponent_bits, mantissa_bits, bias)) for c in range(len(table))]
    assert table.tolist() == expected
    assert float(table[1]) == min_subnormal
    assert float(table.abs().max()) == max_normal
    assert not torch.isinf(table).any() and not torch.isnan(table).any()


@pytest.mark.parametrize("fmt", list(FLOATS))
def test_float_codes_equal_the_reference_including_ties_zeros_subnormals_saturation(
    fmt: str,
) -> None:
    values, num_ties = edge_values(fmt)
    assert num_ties > 0
    codes = encode_float(torch.from_numpy(values), FORMATS[fmt]).numpy()
    expected = reference_codes(values, fmt)
    mismatches = [
        (float(v), int(c), int(e))
        for v, c, e in zip(values, codes, expected, strict=True)
        if c != e
    ]
    assert mismatches == []
    exponent_bits, mantissa_bits, _, _, _ = FLOATS[fmt]
    sign_bit = 1 << (exponent_bits + mantissa_bits)
    max_code = sign_bit - 1

    def encode(xs: list[float]) -> list[int]:
        return encode_float(torch.tensor(xs, dtype=torch.float32), FORMATS[fmt]).tolist()

    # Signed zeros, and negative values that round to zero keep their sign.
    assert encode([0.0, -0.0, -1e-30]) == [0, sign_bit, sign_bit]
    # Saturation, not infinity: everything past the maximum is the maximum code.
    assert encode([1e30, -math.inf]) == [max_code, sign_bit | max_code]


def test_ties_round_to_the_even_mantissa_both_ways() -> None:
    # fp6_e3m2 around 1: 1.0 (code 0b001100), 1.25 (..01), 1.5 (..10), 1.75 (..11), 2.0.
    codes = encode_float(torch.tensor([1.125, 1.375, 1.625, 1.875]), FORMATS["fp6_e3m2"])
    assert codes.tolist() == [0b001100, 0b001110, 0b001110, 0b010000]


def _reference_scaled(w: np.ndarray, max_value: float) -> tuple[np.ndarray, np.ndarray]:
    absmax = np.abs(w).max(axis=1, keepdims=True).astype(np.float32)
    scales = np.where(absmax > 0, absmax / np.float32(max_value), np.float32(1)).astype(np.float32)
    return (w / scales).astype(np.float32), scales


@pytest.mark.parametrize("fmt", list(FLOATS))
def test_quantize_tensor_float_codes_and_scales(fmt: str) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((12, 40)) * 0.05).astype(np.float32)
    w[3] = 0.0  # an all-zero row: scale 1, all codes +0
    # A row whose scale is exactly 1 (its absmax is the format's max): it carries the edge values.
    max_normal = FLOATS[fmt][3]
    edges, _ = edge_values(fmt)
    edges = np.clip(edges[np.isfinite(edges)], -max_normal, max_normal)[:39]
    w[5, :39], w[5, 39] = edges, max_normal
    quantized = quantize_tensor(torch.from_numpy(w), fmt)
    scaled, scales = _reference_scaled(w, max_normal)
    assert quantized.scales.shape == (12, 1)
    assert np.array_equal(quantized.scales.numpy(), scales)
    assert float(quantized.scales[5]) == 1.0
    assert np.array_equal(
        quantized.codes.numpy(), reference_codes(scaled.ravel(), fmt).reshape(w.shape)
    )
    table = {code: float(v) for v, code in magnitudes(fmt)}
    sign_bit = 1 << (FLOATS[fmt][0] + FLOATS[fmt][1])
    values = [
        [(-1 if c & sign_bit else 1) * table[c & (sign_bit - 1)] for c in row]
        for row in quantized.codes.tolist()
    ]
    expected = (np.array(values, dtype=np.float32) * scales).astype(np.float32)
    assert np.array_equal(quantized.dequantize().numpy(), expected)
    assert not quantized.dequantize()[3].any()


def test_quantize_tensor_int8_symmetric_per_channel() -> None:
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((9, 33)) * 0.1).astype(np.float32)
    w[0, :4] = [0.5, -0.5, 0.25, -0.125]  # row scale 0.5/127
    quantized = quantize_tensor(torch.from_numpy(w), "int8")
    scaled, scales = _reference_scaled(w, 127.0)
    expected = np.clip(np.rint(scaled), -127, 127).astype(np.int8)  # rint: half to even
    assert quantized.codes.dtype == torch.uint8
    assert np.array_equal(quantized.codes.view(torch.int8).numpy(), expected)
    assert np.array_equal(quantized.scales.numpy(), scales)
    assert np.array_equal(quantized.dequantize().numpy(), (expected.astype(np.float32) * scales))
    assert quantized.codes.view(torch.int8)[0, :2].tolist() == [127, -127]


def test_quantize_tensor_int4_groups_of_128_asymmetric_with_a_short_last_group() -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((5, 300)) * 0.1).astype(np.float32)  # groups of 128, 128, 44
    w[1, 128:256] = np.abs(w[1, 128:256])  # a group with no negative value: zero point 0
    w[2, 256:] = 0.0  # an all-zero group
    quantized = quantize_tensor(torch.from_numpy(w), "int4")
    assert quantized.scales.shape == quantized.zeros.shape == (5, 3)
    codes = np.zeros_like(w, dtype=np.uint8)
    deq = np.zeros_like(w)
    for row in range(5):
        for g, start in enumerate(range(0, 300, 128)):
            group = w[row, start : start + 128]
            low = np.float32(min(group.min(), 0.0))
            high = np.float32(max(group.max(), 0.0))
            scale = np.float32((high - low) / np.float32(15))
            scale = scale if scale > 0 else np.float32(1)
            zero = np.clip(np.rint(-low / scale), 0, 15)
            q = np.clip(np.rint(group / scale) + zero, 0, 15)
            assert quantized.scales[row, g].item() == scale
            assert quantized.zeros[row, g].item() == zero
            codes[row, start : start + 128] = q
            deq[row, start : start + 128] = (q.astype(np.float32) - np.float32(zero)) * scale
    assert np.array_equal(quantized.codes.numpy(), codes)
    assert np.array_equal(quantized.dequantize().numpy(), deq)
    assert quantized.zeros[1, 1].item() == 0
    assert not quantized.dequantize()[2, 256:].any()
    # Asymmetric: the group's range spans all 16 codes.
    assert quantized.codes[0, :128].min() == 0 and quantized.codes[0, :128].max() == 15


def test_quantize_tensor_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantize_tensor(torch.tensor([[1.0, float("nan")]]), "fp6_e3m2")
    with pytest.raises(ValueError, match="2-D"):
        quantize_tensor(torch.ones(4), "int8")
    with pytest.raises(ValueError, match="unknown quantization format"):
        get_format("fp7")
