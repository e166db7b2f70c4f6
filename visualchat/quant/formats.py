"""The weight formats: small floats (FP6 e3m2, FP5 e2m2, FP4 e2m1) and integers (INT8, INT4).

Design note. A small float has 1 sign bit, E exponent bits with bias b and M mantissa bits, as
OCP's MX element types define them: exponent field 0 holds zero and the subnormals
(m / 2^M * 2^(1-b)); every other field is normal ((1 + m / 2^M) * 2^(e-b)); there is no inf or
NaN, so the top binade is all finite and the largest value is (2 - 2^-M) * 2^(2^E - 1 - b). Codes
are rounded to nearest with ties to even and saturate at +-max. Encoding is written out here
rather than taken from torchao because the codec is this package's subject (and torchao is not a
dependency); the tests check it code for code against an independent enumeration of each
format, and against torchao where it is installed.

Every format decodes through a lookup table indexed by the code's bit pattern, on CPU and in the
Triton kernel alike, so both paths produce the same float32 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int

    @property
    def num_bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal binade (the subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        return (1 << self.exponent_bits) - 1 - self.bias

    @property
    def max_normal(self) -> float:
        return (2 - 2.0**-self.mantissa_bits) * 2.0**self.max_exponent

    def code_values(self) -> torch.Tensor:
        """(2 ** num_bits,) float32: the value of every code (sign bit on top)."""
        values = []
        for code in range(1 << self.num_bits):
            sign = -1.0 if code >> (self.num_bits - 1) else 1.0
            exponent = (code >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)
            mantissa = code & ((1 << self.mantissa_bits) - 1)
            if exponent == 0:
                magnitude = mantissa * 2.0 ** (self.min_exponent - self.mantissa_bits)
            else:
                magnitude = (1 + mantissa / (1 << self.mantissa_bits)) * 2.0 ** (
                    exponent - self.bias
                )
            values.append(sign * magnitude)
        return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class IntFormat:
    name: str
    num_bits: int
    group_size: int | None  # None: one scale per output channel; else groups along the input
    is_symmetric: bool  # symmetric: q in [-qmax, qmax]; else q in [0, 2^bits - 1] with a zero point

    @property
    def qmax(self) -> int:
        return (1 << (self.num_bits - 1)) - 1 if self.is_symmetric else (1 << self.num_bits) - 1

    def code_values(self) -> torch.Tensor:
        """(2 ** num_bits,) float32: the integer each stored bit pattern stands for (two's
        complement for the symmetric formats, unsigned for the asymmetric ones)."""
        codes = torch.arange(1 << self.num_bits, dtype=torch.int32)
        if self.is_symmetric:
            codes = torch.where(
                codes >= 1 << (self.num_bits - 1), codes - (1 << self.num_bits), codes
            )
        return codes.to(torch.float32)


Format = FloatFormat | IntFormat

FORMATS: dict[str, Format] = {
    "fp6_e3m2": FloatFormat("fp6_e3m2", exponent_bits=3, mantissa_bits=2, bias=3),  # max 28
    "fp5_e2m2": FloatFormat("fp5_e2m2", exponent_bits=2, mantissa_bits=2, bias=1),  # max 7
    "fp4_e2m1": FloatFormat("fp4_e2m1", exponent_bits=2, mantissa_bits=1, bias=1),  # max 6
    "int8": IntFormat("int8", num_bits=8, group_size=None, is_symmetric=True),
    "int4": IntFormat("int4", num_bits=4, group_size=128, is_symmetric=False),
}
FORMAT_NAMES = tuple(FORMATS)


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization format {name!r}; choose one of {', '.join(FORMATS)}"
        ) from None


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2 ** exponent as float32, exactly (built from the bit pattern; normal range only)."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def encode_float(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Codes (uint8, same shape) of already-scaled values: round to nearest, ties to even,
    saturate at +-max_normal (infinities too). The sign is kept, so -0.0 and negative values
    that round to zero get the negative-zero code. NaN has no code: check before calling."""
    x = x.to(torch.float32)
    mantissa_bits = fmt.mantissa_bits
    sign = torch.signbit(x).to(torch.int32)
    magnitude = x.abs().clamp(max=fmt.max_normal)
    _, frexp_exponent = torch.frexp(magnitude)  # magnitude = f * 2^exp, f in [0.5, 1)
    # The binade of the value, floored at the smallest normal one (subnormals share its step).
    exponent = (frexp_exponent - 1).clamp(min=fmt.min_exponent)
    step = _pow2(exponent - mantissa_bits)  # spacing of representable values in the binade
    # Exact division by a power of two; torch.round is round-half-to-even, and the parity of
    # `steps` is the parity of the mantissa field (2^M is even), so ties go to the even code.
    steps = torch.round(magnitude / step).to(torch.int32)  # in [0, 2^(M+1)]
    carried = steps == (1 << (mantissa_bits + 1))  # rounded up into the next binade
    steps = torch.where(carried, steps >> 1, steps)
    exponent = exponent + carried.to(torch.int32)
    is_normal = steps >= (1 << mantissa_bits)  # else subnormal (or zero): exponent field 0
    exponent_field = torch.where(is_normal, exponent + fmt.bias, 0)
    mantissa_field = steps - torch.where(is_normal, 1 << mantissa_bits, 0)
    codes = (
        (sign << (fmt.exponent_bits + mantissa_bits))
        | (exponent_field << mantissa_bits)
        | mantissa_field
    )
    return codes.to(torch.uint8)
