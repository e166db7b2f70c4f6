"""BlockManager: block arithmetic, allocation without partial grants, slots; EngineConfig."""

from __future__ import annotations

import pytest
import torch

from serving.engine.config import EngineConfig
from serving.engine.kv_cache import BlockManager


def test_blocks_needed_rounds_up_and_counts_blocks_already_held() -> None:
    blocks = BlockManager(num_blocks=10, block_size=4)
    assert blocks.blocks_needed(0, []) == 0
    assert blocks.blocks_needed(1, []) == 1
    assert blocks.blocks_needed(4, []) == 1
    assert blocks.blocks_needed(5, []) == 2
    assert blocks.blocks_needed(10, [3]) == 2
    assert blocks.blocks_needed(12, [3, 4, 5]) == 0
    assert blocks.blocks_needed(3, [3, 4]) == 0  # never negative


def test_grow_extends_the_table_to_hold_the_positions() -> None:
    blocks = BlockManager(num_blocks=5, block_size=4)
    table: list[int] = []
    assert blocks.grow(table, 9)
    assert len(table) == 3 and len(set(table)) == 3
    assert (blocks.num_free_blocks, blocks.num_used_blocks) == (2, 3)
    first = list(table)
    assert blocks.grow(table, 12)  # still fits three blocks: nothing taken
    assert table == first and blocks.num_free_blocks == 2
    assert blocks.grow(table, 13)
    assert table[:3] == first and len(table) == 4  # existing blocks keep their positions
    assert blocks.num_free_blocks == 1


def test_running_out_returns_false_without_partial_allocation() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    held: list[int] = []
    assert blocks.grow(held, 12)
    other: list[int] = [99]  # a table that is extended only on success
    assert not blocks.grow(other, 4 * 3)  # needs 2 more, 1 free
    assert other == [99]
    assert blocks.num_free_blocks == 1
    assert blocks.can_allocate(1) and not blocks.can_allocate(2)
    fresh: list[int] = []
    assert not blocks.grow(fresh, 5)
    assert fresh == [] and blocks.num_free_blocks == 1
    assert blocks.grow(fresh, 4)  # what does fit is still granted
    assert blocks.num_free_blocks == 0 and not blocks.can_allocate(1)
    assert blocks.can_allocate(0)
    assert set(held) | set(fresh) == {0, 1, 2, 3}


def test_free_returns_every_block_and_clears_the_table() -> None:
    blocks = BlockManager(num_blocks=6, block_size=2)
    a: list[int] = []
    b: list[int] = []
    assert blocks.grow(a, 5) and blocks.grow(b, 6)
    assert set(a).isdisjoint(b) and blocks.num_free_blocks == 0
    held_by_a = list(a)
    blocks.free(a)
    assert a == []
    assert blocks.num_free_blocks == 3 and blocks.num_used_blocks == 3
    c: list[int] = []
    assert blocks.grow(c, 6)
    assert sorted(c) == sorted(held_by_a)  # the freed blocks are reused
    blocks.free(b)
    blocks.free(c)
    assert blocks.num_free_blocks == 6
    assert blocks.grow(d := [], 12) and sorted(d) == list(range(6))


def test_slot_and_slots_follow_the_block_table() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    table = [7, 2, 5]
    assert [blocks.slot(table, p) for p in (0, 3, 4, 7, 8, 11)] == [28, 31, 8, 11, 20, 23]
    slots = blocks.slots(table, 2, 10)
    assert slots.dtype == torch.long
    assert slots.tolist() == [30, 31, 8, 9, 10, 11, 20, 21]
    assert blocks.slots(table, 0, 12).tolist() == [blocks.slot(table, p) for p in range(12)]
    assert blocks.slots(table, 5, 5).tolist() == []


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0)])
def test_block_manager_refuses_empty_caches(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        BlockManager(num_blocks, block_size)


def test_engine_config_resolves_the_cache_size() -> None:
    assert EngineConfig(block_size=16, max_cache_tokens=1000).resolved_num_blocks == 62
    assert EngineConfig(block_size=4, num_blocks=40).resolved_num_blocks == 40
    assert EngineConfig(block_size=64, max_cache_tokens=64).resolved_num_blocks == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "block_size must be positive, got 0"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be positive, got 0"),
        ({"num_blocks": 1}, "num_blocks must be at least 2, got 1"),
        ({"max_num_seqs": 0}, "max_num_seqs must be positive, got 0"),
        ({"min_budget": 64, "max_budget": 32}, "min_budget <= max_budget"),
        ({"target_step_ms": 0}, "target_step_ms must be positive"),
        ({"decode_mirror_tokens": -1}, "decode_mirror_tokens must be non-negative, got -1"),
    ],
)
def test_engine_config_validates_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
