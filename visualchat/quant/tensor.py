"""QuantizedTensor and quantize_tensor: a 2-D weight to codes + scales (+ zero points).

Scales. The float formats and INT8 have one scale per output channel (row): absmax / max_value,
so the largest weight of a row lands on the format's largest value. INT4 has one scale and one
zero point per group of `group_size` consecutive inputs of a row (the last group may be
shorter): the group's range, widened to include 0, is mapped onto 0..15. An all-zero row or
group gets scale 1, so every code decodes to exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from visualchat.quant.formats import FloatFormat, Format, IntFormat, encode_float, get_format
from visualchat.quant.packing import LAYOUTS, unpack_codes


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # (out, in) uint8 bit patterns (two's complement for int8)
    scales: torch.Tensor  # (out, num_groups) float32; num_groups = 1 per output channel
    zeros: torch.Tensor | None  # (out, num_groups) uint8 zero points (asymmetric formats only)
    shape: tuple[int, int]  # (out_features, in_features)
    fmt: str  # a key of formats.FORMATS

    @property
    def format(self) -> Format:
        return get_format(self.fmt)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weight: value(code) (- zero) * scale, in float32, then cast to dtype."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.fmt).to(dtype)


_VALUE_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def value_table(fmt: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2 ** bits,) float32 value of each code of the format (cached per device)."""
    device = torch.device(device)
    key = (fmt, device)
    if key not in _VALUE_TABLES:
        _VALUE_TABLES[key] = get_format(fmt).code_values().to(device)
    return _VALUE_TABLES[key]


def group_size_of(fmt: str, in_features: int) -> int:
    """Inputs per scale: the format's group size, or the whole row for per-channel formats."""
    spec = get_format(fmt)
    group_size = spec.group_size if isinstance(spec, IntFormat) else None
    return min(group_size or in_features, in_features)


def dequantize_codes(
    codes: torch.Tensor,  # (out, in) uint8
    scales: torch.Tensor,  # (out, num_groups) float32
    zeros: torch.Tensor | None,  # (out, num_groups) uint8 or None
    fmt: str,
) -> torch.Tensor:
    """(out, in) float32: value(code) (- zero) * scale, the definition of every format."""
    values = value_table(fmt, codes.device)[codes.int()]  # (out, in) float32
    return apply_scales(values, scales, zeros, fmt)


def apply_scales(
    values: torch.Tensor,  # (out, in) float32 code values; modified in place
    scales: torch.Tensor,  # (out, num_groups) float32
    zeros: torch.Tensor | None,  # (out, num_groups) uint8 or None
    fmt: str,
) -> torch.Tensor:
    """(value - zero) * scale for each group of each row, in float32, in place."""
    in_features = values.shape[1]
    group_size = group_size_of(fmt, in_features)
    num_full = in_features // group_size
    full = num_full * group_size
    parts = [(values[:, :full].unflatten(1, (num_full, group_size)), slice(0, num_full))]
    if full < in_features:  # a shorter last group
        parts.append((values[:, full:].unsqueeze(1), slice(num_full, num_full + 1)))
    for view, groups in parts:  # view: (out, groups, group_size)
        if zeros is not None:
            view.sub_(zeros[:, groups].float().unsqueeze(-1))
        view.mul_(scales[:, groups].unsqueeze(-1))
    return values


_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pair_table(fmt: str, device: torch.device) -> torch.Tensor:
    """(2 ** (8 + 2 * high_bits),) int64 words, each holding the bits of the two float32 values
    of two consecutive codes, indexed by their shared low-plane byte plus, above bit 8, their
    2 x high_bits bits of the high plane. One 8-byte gather per pair is the fastest lookup
    PyTorch offers on CPU (about 2.5x a gather of rows of two floats); integer words, so the
    gather only moves bits."""
    key = (fmt, device)
    if key not in _PAIR_TABLES:
        high_bits = LAYOUTS[fmt].high_bits
        table = value_table(fmt, device)
        index = torch.arange(1 << (8 + 2 * high_bits), device=device)
        low, high = index & 0xFF, index >> 8
        first = (low & 0xF) | ((high & ((1 << high_bits) - 1)) << 4)
        second = (low >> 4) | ((high >> high_bits) << 4)
        pairs = torch.stack([table[first], table[second]], dim=1)  # (entries, 2) float32
        _PAIR_TABLES[key] = pairs.view(torch.int64).view(-1)  # (entries,) 8-byte words
    return _PAIR_TABLES[key]


def decode_planes(
    codes_low: torch.Tensor,
    codes_high: torch.Tensor | None,
    fmt: str,
    shape: tuple[int, int],
) -> torch.Tensor:
    """(out, in) float32 code values straight from the packed planes: one table lookup per pair
    of codes (a byte of the 4-bit plane and the pair's high bits), not per code, which makes
    the CPU path several times faster than unpacking codes first. Same values as value_table."""
    count = shape[0] * shape[1]
    layout = LAYOUTS[fmt]
    if layout.low_bits == 8:  # int8: the stored byte is the two's complement value
        return codes_low[:count].view(torch.int8).float().view(shape)
    num_pairs = count // 2
    pair_bits = 2 * layout.high_bits  # high-plane bits of a pair
    pairs_per_high_byte = 8 // pair_bits if pair_bits else 1
    if count % 2 or num_pairs % pairs_per_high_byte:
        codes = unpack_codes(codes_low, codes_high, layout, shape)
        return value_table(fmt, codes_low.device)[codes.int()]
    # (num_high_bytes, pairs_per_high_byte): pair p uses low byte p and bits p * pair_bits of
    # the high plane; filling the columns in place avoids unpacking the high plane.
    index = codes_low[:num_pairs].view(-1, pairs_per_high_byte).int()
    if pair_bits:
        high = codes_high.int() << 8  # (num_high_bytes,)
        mask = ((1 << pair_bits) - 1) << 8
        for k in range(pairs_per_high_byte):
            index[:, k] |= (high >> (k * pair_bits)) & mask
    pairs = _pair_table(fmt, codes_low.device).index_select(0, index.view(-1))  # (pairs,)
    return pairs.view(torch.float32).view(shape)


def quantize_tensor(weight: torch.Tensor, fmt: str) -> QuantizedTensor:
    """Quantize a 2-D weight (out_features, in_features) to the named format."""
    spec = get_format(fmt)
    if weight.dim() != 2:
        raise ValueError(f"quantize_tensor expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight has NaN or infinite values; they cannot be quantized")
    shape = (w.shape[0], w.shape[1])
    if isinstance(spec, FloatFormat):
        scales = _row_scales(w, spec.max_normal)  # (out, 1)
        codes = encode_float(w / scales, spec)
        return QuantizedTensor(codes, scales, None, shape, fmt)
    if spec.is_symmetric:
        scales = _row_scales(w, float(spec.qmax))  # (out, 1)
        q = torch.round(w / scales).clamp(-spec.qmax, spec.qmax).to(torch.int8)
        return QuantizedTensor(q.view(torch.uint8), scales, None, shape, fmt)
    return _quantize_asymmetric(w, spec, fmt)


def _row_scales(w: torch.Tensor, max_value: float) -> torch.Tensor:
    absmax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    scales = absmax / max_value
    return torch.where(absmax > 0, scales, torch.ones_like(scales))


def _quantize_asymmetric(w: torch.Tensor, spec: IntFormat, fmt: str) -> QuantizedTensor:
    out_features, in_features = w.shape
    group_size = group_size_of(fmt, in_features)
    num_groups = math.ceil(in_features / group_size)
    padding = num_groups * group_size - in_features
    # Zero padding leaves each group's range alone: the range always includes 0.
    grouped = torch.nn.functional.pad(w, (0, padding)).view(out_features, num_groups, group_size)
    low = grouped.amin(dim=-1).clamp(max=0.0)  # (out, num_groups)
    high = grouped.amax(dim=-1).clamp(min=0.0)
    scales = (high - low) / spec.qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-low / scales).clamp(0, spec.qmax)  # (out, num_groups)
    q = torch.round(grouped / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    q = q.clamp(0, spec.qmax).to(torch.uint8).view(out_features, num_groups * group_size)
    return QuantizedTensor(
        q[:, :in_features].contiguous(),
        scales,
        zeros.to(torch.uint8),
        (out_features, in_features),
        fmt,
    )


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|W|^2 / |W - W_hat|^2), in dB (inf if exact)."""
    reference = reference.detach().double()
    noise = float((reference - approximation.detach().double()).square().sum())
    signal = float(reference.square().sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)
