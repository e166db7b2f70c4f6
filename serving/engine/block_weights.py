"""Float32 weights that are exactly llama.cpp block formats, found and packed for the block
kernels (`block_kernels.py`, `native/block_gemm.cpp`).

Why. A GGUF file stores a model's weights in blocks of 32 with a float16 scale (and offset):
Q4_1 as w = d * q + m with q in 0..15, Q8_0 as w = d * q with q in -128..127. transformers
dequantizes them to float32 on load, so every product reads 4 bytes a weight where the file
held 0.625 (Q4_1) or 1.0625 (Q8_0). Those float32 values are still exactly a block format, and
the blocks can be found again from the values alone, with no knowledge of the file or of how a
loader renamed or permuted the tensors:

- Q4_1: q = 0 is in every block (llama.cpp takes m as the block's minimum), so m = min(block);
  d is (max - m) / 15 rounded to float16, or a float16 neighbour of it;
- Q8_0: d is max|w| / 127 rounded to float16, or a neighbour.

A weight counts as a block format only if every one of its blocks rebuilds to the float32 value
bit for bit (`from_float` checks it; one block off and the weight stays float32), so the block
kernels multiply the very weights the float32 model holds: with d and m float16 values, d * q is
exact in float32, and the kernel's fused d * q + m rounds once where gguf's numpy rounded
twice, the first time exactly.

A LoRA adapter merged into a layer (as `visualchat.model.delta` loads one) leaves no block
format behind, but its factors are kept on the layer (`merged_lora`): `BlockWeight.for_layers`
looks for the blocks of the base under them, redoes the merge on the base it found and accepts
it only if that gives the merged weight to the bit, and the product then adds the low-rank term
(x @ a^T) @ b^T to the base's. That equals the merged product up to the merge's own rounding.

The packed layout (per 16 outputs by 32 inputs, tiles outermost) is the kernel's; its comment in
`block_gemm.cpp` is the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from serving.engine import block_kernels
from serving.engine.block_kernels import GROUP, TILE
from visualchat.model.delta import MergedLora

# float16 neighbours of the first guess for d, in the order tried
_NEIGHBOURS = (0, -1, 1, -2, 2)
_ROWS_AT_ONCE = 4096  # rows recovered together: bounds the temporaries to ~150 MB


def _float16_steps(d: torch.Tensor, step: int) -> torch.Tensor:
    """d (float16-valued float32, positive) moved `step` float16 values up or down."""
    bits = d.half().view(torch.int16) + step
    return bits.view(torch.float16).float()


def _find_scales(
    first: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    delta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per block, the first of d = `first` and its float16 neighbours whose codes
    (`encode(d)`) rebuild (`decode(codes, d)`, plus delta) the target to the bit: (codes,
    d (rows, groups, 1)), or None if some block has none."""
    codes_found = torch.zeros_like(target)
    d = torch.zeros_like(first)
    found = torch.zeros_like(first, dtype=torch.bool)
    for step in _NEIGHBOURS:
        guess = _float16_steps(first, step) if step else first
        codes = torch.where(guess > 0, encode(guess), torch.zeros_like(target))  # 0: constant
        exact = _rebuilds(decode(codes, guess), target, delta) & ~found
        codes_found = torch.where(exact, codes, codes_found)
        d = torch.where(exact, guess, d)
        found |= exact
        if found.all():
            return codes_found, d
    return None


def _q4_1(
    x: torch.Tensor, target: torch.Tensor, delta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """x: (rows, groups, 32) base values, exact or within a rounding of them ->
    (q uint8 like x, d (rows, groups), m) whose rebuilt values (plus delta) equal target
    exactly, or None."""
    m = x.amin(-1, keepdim=True).half().float()  # (rows, groups, 1)
    first = ((x.amax(-1, keepdim=True) - m) / 15).half().float()
    found = _find_scales(
        first,
        lambda d: ((x - m) / d).round().clamp(0, 15),
        lambda q, d: q * d + m,
        target,
        delta,
    )
    if found is None:
        return None
    q, d = found
    return q.to(torch.uint8), d.squeeze(-1), m.squeeze(-1)


def _q8_0(
    x: torch.Tensor, target: torch.Tensor, delta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """As `_q4_1` for Q8_0: (q int8 like x, d (rows, groups)) or None."""
    first = (x.abs().amax(-1, keepdim=True) / 127).half().float()
    found = _find_scales(
        first,
        lambda d: (x / d).round().clamp(-128, 127),
        lambda q, d: q * d,
        target,
        delta,
    )
    if found is None:
        return None
    q, d = found
    return q.to(torch.int8), d.squeeze(-1)


def _rebuilds(base: torch.Tensor, target: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """(rows, groups, 1): whether each block's rebuilt base (plus the merged delta, added as
    the merge added it) is the target to the bit."""
    rebuilt = base if delta is None else base + delta
    return (rebuilt == target).all(-1, keepdim=True)


def _tiles(values: torch.Tensor, tiles: int, groups: int) -> torch.Tensor:
    """(tiles * 16, groups) float32 -> (tiles, groups, 64) bytes: the tile's 16 values."""
    per_tile = values.view(tiles, TILE, groups).permute(0, 2, 1).contiguous()
    return per_tile.view(torch.uint8).view(tiles, groups, TILE * 4)


def pack_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """q (n, k) uint8 0..15, d and m (n, k / 32) -> (n / 16, k / 32, 384) uint8 blocks."""
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    pairs = q.view(tiles, TILE, groups, GROUP // 2, 2).permute(0, 2, 3, 1, 4)  # (t, g, p, j, 2)
    codes = (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(tiles, groups, GROUP * TILE // 2)
    return torch.cat([_tiles(d, tiles, groups), _tiles(m, tiles, groups), codes], -1).contiguous()


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """q (n, k) int8, d (n, k / 32) -> (n / 16, k / 32, 576) uint8 blocks."""
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    codes = q.view(tiles, TILE, groups, GROUP).permute(0, 2, 3, 1).contiguous()  # (t, g, k, j)
    codes = codes.view(torch.uint8).view(tiles, groups, GROUP * TILE)
    return torch.cat([_tiles(d, tiles, groups), codes], -1).contiguous()


@dataclass
class BlockWeight:
    """A float32 (out, in) weight held as `fmt` blocks in the kernel's layout, plus, where the
    weight is a base with LoRA factors merged into it, those factors: the product is then
    x @ base^T + (x @ a^T) @ b^T, the same sum as x @ weight^T up to the merge's rounding."""

    fmt: str  # one of block_kernels.FORMATS
    blocks: torch.Tensor  # (out / 16, in / 32, block bytes) uint8
    out_features: int
    in_features: int
    low_rank: block_kernels.LowRank | None = None  # merged LoRA factors, set apart
    # the kernel call, checked and bound once (see block_kernels.product)
    _bound: Callable[[torch.Tensor], torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._bound = block_kernels.product(self.fmt, self.blocks, self.out_features, self.low_rank)

    @classmethod
    def for_layers(cls, weight: torch.Tensor, layers: Sequence[nn.Module]) -> BlockWeight | None:
        """The block form of `weight`, the layers' weights stacked by rows (one layer: its
        own), or None. A layer with `merged_lora` (visualchat.model.delta.MergedLora) counts
        when its base, the weight before the merge, is a block format: the merge is redone on
        the found base and must give the layer's weight to the bit."""
        factors = [getattr(layer, "merged_lora", None) for layer in layers]
        if all(f is None for f in factors):
            return cls.from_float(weight)
        if any(f is not None and f.a.dtype != torch.float32 for f in factors) or any(
            layer.weight.shape[0] % TILE for layer in layers
        ):
            return None  # a tile of 16 outputs must belong to one layer
        with torch.no_grad():
            deltas = [
                f.delta() if f is not None else weight.new_zeros(layer.weight.shape)
                for f, layer in zip(factors, layers, strict=True)
            ]
            found = cls.from_float(weight, torch.cat(deltas))
        if found is None:
            return None
        low_rank = _low_rank(factors, [layer.weight.shape[0] for layer in layers])
        return dataclasses.replace(found, low_rank=low_rank)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, delta: torch.Tensor | None = None
    ) -> BlockWeight | None:
        """The weight's exact Q4_1 form, else its exact Q8_0 form, else None: shapes the
        kernels cannot tile (out not a multiple of 16, in not of 32), other dtypes, or a
        weight of which some block is not exactly the format. With `delta` (out, in), the
        form of a base such that base + delta is the weight to the bit."""
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
            return None
        n, k = weight.shape
        if n % TILE or k % GROUP or not bool(torch.isfinite(weight).all()):
            return None
        with torch.no_grad():
            for fmt, recover, pack in (("q4_1", _q4_1, pack_q4_1), ("q8_0", _q8_0, pack_q8_0)):
                parts = []
                for start in range(0, n, _ROWS_AT_ONCE):
                    rows = slice(start, start + _ROWS_AT_ONCE)
                    target = weight[rows].reshape(-1, k // GROUP, GROUP)
                    part_delta = None if delta is None else delta[rows].reshape(target.shape)
                    base = target if part_delta is None else target - part_delta
                    found = recover(base, target, part_delta)
                    if found is None:
                        break
                    parts.append(found)
                else:
                    joined = [torch.cat(column) for column in zip(*parts, strict=True)]
                    q, scales = joined[0].view(n, k), joined[1:]
                    return cls(fmt, pack(q, *scales), n, k)
        return None

    def multiply(self, rows: torch.Tensor) -> torch.Tensor:
        """(m, in) float32 -> (m, out)."""
        return self._bound(rows)

    @property
    def num_bytes(self) -> int:
        extra = 0 if self.low_rank is None else self.low_rank.num_bytes
        return self.blocks.numel() + extra


def _low_rank(factors: Sequence[MergedLora | None], outs: Sequence[int]) -> block_kernels.LowRank:
    """The stacked layers' factors in the kernel's layout: a's one above the other; per tile of
    16 outputs, its layer's columns of u = x @ a^T and its layer's b (times the scale) for those
    outputs, (rank, 16) each. A layer without factors has rank 0."""
    a_rows, tile_low, b_parts = [], [], []
    u_start = b_offset = 0
    for f, out in zip(factors, outs, strict=True):
        rank = 0 if f is None else f.a.shape[0]
        if f is not None:
            a_rows.append(f.a)
            scaled = (f.b * f.scale).view(out // TILE, TILE, rank)  # (tiles, 16, rank)
            b_parts.append(scaled.transpose(1, 2).reshape(-1))  # per tile (rank, 16)
        for _ in range(out // TILE):
            tile_low.append((u_start, rank, b_offset))
            b_offset += rank * TILE
        u_start += rank
    return block_kernels.LowRank(
        a=torch.cat(a_rows).contiguous(),
        tile_low=torch.tensor(tile_low, dtype=torch.int64),
        b=torch.cat(b_parts).contiguous(),
    )
