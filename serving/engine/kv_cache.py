"""The block manager: which fixed-size cache blocks each sequence holds.

Blocks are interchangeable slots of `block_size` positions; a sequence's block table lists its
blocks in position order, so position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Nothing is shared between
sequences, so freeing is returning a sequence's blocks to the free list.
"""

from __future__ import annotations

from collections import deque

import torch


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need positive num_blocks and block_size, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int, block_table: list[int]) -> int:
        """Extra blocks a sequence needs to hold num_tokens positions."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend block_table in place to hold num_tokens positions; False if out of blocks."""
        needed = self.blocks_needed(num_tokens, block_table)
        if needed > len(self._free):
            return False
        block_table.extend(self._free.popleft() for _ in range(needed))
        return True

    def free(self, block_table: list[int]) -> None:
        self._free.extend(block_table)
        block_table.clear()

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """(end - start,) cache slots of positions start..end-1."""
        positions = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def slot(self, block_table: list[int], position: int) -> int:
        return (
            block_table[position // self.block_size] * self.block_size + position % self.block_size
        )
