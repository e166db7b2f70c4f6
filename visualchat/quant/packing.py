"""Bit packing of codes into byte planes.

Design note. FP6-LLM stores a 6-bit weight as a 2-bit and a 4-bit part in two separate planes
("4+2"), so that every load is byte-aligned and no code straddles a byte. The same idea gives
FP5 as 1+4. The codes of a tensor are taken in row-major order; the code's high bits go to the
narrow plane and its low 4 (or 8) bits to the wide one. Inside a byte, element i of the plane
sits at bits [i * bits, (i + 1) * bits) (little-endian), so element j of the tensor is in byte
j // (8 / bits) at shift (j % (8 / bits)) * bits -- the address arithmetic of the Triton kernel.
(FP6-LLM further interleaves the planes for its tensor-core tiles; this layout keeps the plain
order, which is what a portable kernel and the CPU path want.)

Stored bytes per weight: FP6 6/8, FP5 5/8, FP4 and INT4 4/8, INT8 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlaneLayout:
    low_bits: int  # bits of the wide plane: 4 or 8
    high_bits: int  # bits of the narrow plane: 0 (none), 1 or 2

    def __post_init__(self) -> None:
        if self.low_bits not in (4, 8) or self.high_bits not in (0, 1, 2):
            raise ValueError(f"unsupported plane layout {self.low_bits}+{self.high_bits} bits")

    @property
    def num_bits(self) -> int:
        return self.low_bits + self.high_bits

    def num_bytes(self, num_codes: int) -> tuple[int, int]:
        """Bytes of the (low, high) planes for num_codes codes."""
        low = -(-num_codes * self.low_bits // 8)
        high = -(-num_codes * self.high_bits // 8)
        return low, high


LAYOUTS: dict[str, PlaneLayout] = {
    "fp6_e3m2": PlaneLayout(low_bits=4, high_bits=2),
    "fp5_e2m2": PlaneLayout(low_bits=4, high_bits=1),
    "fp4_e2m1": PlaneLayout(low_bits=4, high_bits=0),
    "int8": PlaneLayout(low_bits=8, high_bits=0),
    "int4": PlaneLayout(low_bits=4, high_bits=0),
}


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(n,) uint8 values below 2^bits -> (ceil(n * bits / 8),) uint8, little-endian in a byte."""
    if bits == 8:
        return values.reshape(-1).to(torch.uint8).clone()
    per_byte = 8 // bits
    flat = values.reshape(-1).to(torch.uint8)
    padding = (-flat.numel()) % per_byte
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    groups = flat.view(-1, per_byte)  # (num_bytes, per_byte)
    packed = groups[:, 0].clone()
    for i in range(1, per_byte):
        packed |= groups[:, i] << (i * bits)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: (count,) uint8."""
    if bits == 8:
        return packed[:count]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).view(-1)[:count]  # (num_bytes * per_byte,) -> (count,)


def pack_codes(
    codes: torch.Tensor, layout: PlaneLayout
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (any shape, uint8) -> (low plane, high plane or None)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) >> layout.num_bits:
        raise ValueError(f"codes do not fit in {layout.num_bits} bits")
    low = pack_bits(flat & ((1 << layout.low_bits) - 1), layout.low_bits)
    if layout.high_bits == 0:
        return low, None
    return low, pack_bits(flat >> layout.low_bits, layout.high_bits)


def unpack_codes(
    low: torch.Tensor, high: torch.Tensor | None, layout: PlaneLayout, shape: tuple[int, ...]
) -> torch.Tensor:
    """Planes -> codes (uint8) of the given shape."""
    count = 1
    for size in shape:
        count *= size
    codes = unpack_bits(low, layout.low_bits, count)
    if layout.high_bits:
        if high is None:
            raise ValueError(f"a {layout.num_bits}-bit layout needs its high plane")
        codes = codes | (unpack_bits(high, layout.high_bits, count) << layout.low_bits)
    return codes.view(shape)
