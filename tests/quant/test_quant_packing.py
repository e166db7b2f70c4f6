"""Bit planes: exact round trips, the documented bit order, and the stored sizes."""

from __future__ import annotations

import pytest
import torch

from visualchat.quant import LAYOUTS, QuantLinear, pack_codes, unpack_codes
from visualchat.quant.packing import pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [1, 3, 8, 9, 1001])
def test_pack_bits_round_trip(bits: int, count: int) -> None:
    generator = torch.Generator().manual_seed(count * 10 + bits)
    values = torch.randint(0, 1 << bits, (count,), generator=generator, dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-count * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_bit_order_is_little_endian_within_a_byte() -> None:
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8)
    assert pack_bits(bits, 1).tolist() == [0b10000001, 0b1]


def test_fp6_splits_into_a_2_bit_and_a_4_bit_plane() -> None:
    codes = torch.tensor([0b110101, 0b011010, 0b000001, 0b101111], dtype=torch.uint8)
    low, high = pack_codes(codes, LAYOUTS["fp6_e3m2"])
    assert low.tolist() == [0b1010_0101, 0b1111_0001]  # low nibbles, two per byte
    assert high.tolist() == [0b10_00_01_11]  # top 2 bits, four per byte


@pytest.mark.parametrize("fmt", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(3, 5), (16, 64), (7, 129)])
def test_pack_codes_round_trip(fmt: str, shape: tuple[int, int]) -> None:
    layout = LAYOUTS[fmt]
    generator = torch.Generator().manual_seed(shape[0] * shape[1])
    codes = torch.randint(0, 1 << layout.num_bits, shape, generator=generator, dtype=torch.uint8)
    low, high = pack_codes(codes, layout)
    assert (high is None) == (layout.high_bits == 0)
    assert torch.equal(unpack_codes(low, high, layout, shape), codes)


def test_pack_codes_rejects_codes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="5 bits"):
        pack_codes(torch.tensor([32], dtype=torch.uint8), LAYOUTS["fp5_e2m2"])


def test_stored_code_bytes_are_6_5_and_4_eighths_of_int8() -> None:
    def code_bytes(fmt: str) -> int:
        layer = QuantLinear(256, 64, fmt, bias=False)
        planes = [layer.codes_low, layer.codes_high]
        return sum(p.numel() for p in planes if p is not None)

    int8 = code_bytes("int8")
    assert int8 == 256 * 64
    assert code_bytes("fp6_e3m2") * 8 == int8 * 6
    assert code_bytes("fp5_e2m2") * 8 == int8 * 5
    assert code_bytes("fp4_e2m1") * 8 == int8 * 4
    assert code_bytes("int4") * 8 == int8 * 4
