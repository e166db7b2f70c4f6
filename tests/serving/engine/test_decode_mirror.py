"""The decode mirror holds what a fresh gather from the paged cache would give, step after step,
and gathers again whenever the group changes in any way but one position per member."""

from __future__ import annotations

import pytest
import torch

from serving.engine.decode_mirror import HEADROOM, DecodeMirror
from serving.engine.paged_attention import PagedBatch, PagedKVStore, build_group, paged_attention

KV_HEADS, HEAD_DIM, SLOTS = 2, 4, 4096


class Cache:
    """One layer's paged keys and values, and sequences growing in scattered slots."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.keys = torch.randn(SLOTS, KV_HEADS, HEAD_DIM, generator=generator)
        self.values = torch.randn(SLOTS, KV_HEADS, HEAD_DIM, generator=generator)
        self.free = torch.randperm(SLOTS, generator=generator).tolist()
        self.slots: dict[str, list[int]] = {}

    def grow(self, member: str, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `count` new positions of `member`: the last one's (kv_heads, d) key, value."""
        slots = self.slots.setdefault(member, [])
        for _ in range(count):
            slot = self.free.pop()
            slots.append(slot)
            self.keys[slot] = torch.randn(KV_HEADS, HEAD_DIM)
            self.values[slot] = torch.randn(KV_HEADS, HEAD_DIM)
        return self.keys[slots[-1]], self.values[slots[-1]]

    def step(self, mirror: DecodeMirror, members: tuple[str, ...]) -> bool:
        """One decode step of `members` (each one position further) through the mirror; checks
        its keys and values against a fresh gather. Returns whether the mirror took the group."""
        new = [self.grow(m) for m in members]
        key_slots = [torch.tensor(self.slots[m]) for m in members]
        if not mirror.plan(members, key_slots):
            return False
        num_keys = max(len(s) for s in key_slots)
        new_keys = torch.stack([k for k, _ in new])  # (b, kv_heads, d)
        new_values = torch.stack([v for _, v in new])
        keys, values = mirror.keys_values(
            0, self.keys, self.values, new_keys, new_values, num_keys
        )  # (b, kv_heads, num_keys, d)
        assert keys.shape == values.shape == (len(members), KV_HEADS, num_keys, HEAD_DIM)
        for i, slots in enumerate(key_slots):  # past a member's end: masked, never read
            n = len(slots)
            assert torch.equal(keys[i, :, :n], self.keys[slots].transpose(0, 1))
            assert torch.equal(values[i, :, :n], self.values[slots].transpose(0, 1))
        return True


def test_appends_while_the_group_only_grows_and_gathers_on_any_other_change() -> None:
    cache, mirror = Cache(), DecodeMirror(num_layers=1, max_tokens=4096)
    cache.grow("a", 20)  # prompts already in the cache
    cache.grow("b", 5)
    counts = []

    def step(members: tuple[str, ...]) -> None:
        assert cache.step(mirror, members)
        counts.append((mirror.num_gathers, mirror.num_appends))

    step(("a", "b"))  # first sight: gather
    step(("a", "b"))
    step(("a", "b"))  # one position further each: appends
    assert counts == [(1, 0), (1, 1), (1, 2)]
    step(("b",))  # a finished
    assert counts[-1] == (2, 2)
    step(("b",))
    assert counts[-1] == (2, 3)
    cache.grow("c", 7)
    step(("b", "c"))  # c joins
    step(("c", "b"))  # same members, other order
    assert counts[-2:] == [(3, 3), (4, 3)]
    cache.grow("b")  # b skips a step (its position comes from elsewhere)
    step(("c", "b"))
    assert counts[-1] == (5, 3)
    for _ in range(HEADROOM):  # the room the gather left: HEADROOM more positions
        step(("c", "b"))
    assert counts[-1] == (5, 3 + HEADROOM)
    step(("c", "b"))  # outgrowing it gathers once more
    assert counts[-1] == (6, 3 + HEADROOM)


def test_a_group_over_the_limit_is_not_mirrored_and_nothing_is_held() -> None:
    cache = Cache()
    limit = 2 * (30 + HEADROOM)
    mirror = DecodeMirror(num_layers=1, max_tokens=limit)
    cache.grow("a", 28)
    cache.grow("b", 28)
    assert cache.step(mirror, ("a", "b"))  # 29 positions each: within the limit
    assert mirror.num_bytes > 0
    assert cache.step(mirror, ("a", "b"))  # 30
    assert not cache.step(mirror, ("a", "b"))  # 31: over it
    assert mirror.num_bytes == 0 and mirror.members == ()
    assert not DecodeMirror(1, max_tokens=0).plan(("a",), [torch.arange(3)])


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        DecodeMirror(1, max_tokens=-1)


def test_a_swap_of_two_members_with_equal_lengths_gathers() -> None:
    cache, mirror = Cache(), DecodeMirror(num_layers=1, max_tokens=4096)
    cache.grow("x", 10)
    cache.grow("y", 10)
    assert cache.step(mirror, ("x", "y"))
    assert cache.step(mirror, ("y", "x"))  # lengths alone would allow an append
    assert (mirror.num_gathers, mirror.num_appends) == (2, 0)


@pytest.mark.parametrize("mmca", [True, False])
def test_paged_attention_through_the_mirror_equals_the_gather_even_off_the_front(
    mmca: bool,
) -> None:
    """A decode group whose rows are not the pass's first (a one-token prompt chunk can sit
    behind another chunk): the mirror appends each member's own new key, and attention over it
    equals attention over a fresh gather to the bit, pass after pass."""
    heads, num_tokens = 2 * KV_HEADS, 4
    rows = [torch.tensor([0]), torch.tensor([3])]  # rows 1, 2: another sequence's chunk
    slots = {"a": list(range(10, 16)), "b": list(range(20, 24)), "other": [40, 41]}
    generator = torch.Generator().manual_seed(1)
    stores = [PagedKVStore(1, 64, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))]
    stores.append(PagedKVStore(1, 64, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu")))
    prompt_keys = torch.randn(64, KV_HEADS, HEAD_DIM, generator=generator)
    prompt_values = torch.randn(64, KV_HEADS, HEAD_DIM, generator=generator)
    tags = torch.randint(0, 2, (64,), generator=generator)  # text and image positions
    for store in stores:
        store.keys[0].copy_(prompt_keys)
        store.values[0].copy_(prompt_values)
        store.tags.copy_(tags)
    mirror = DecodeMirror(num_layers=1, max_tokens=4096)
    for a_len, b_len in ((5, 3), (6, 4)):  # each member one position further
        key_slots = [torch.tensor(slots["a"][:a_len]), torch.tensor(slots["b"][:b_len])]
        new_slots = torch.tensor([slots["a"][a_len - 1], *slots["other"], slots["b"][b_len - 1]])
        q = torch.randn(num_tokens, heads, HEAD_DIM, generator=generator)
        k = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=generator)
        v = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=generator)
        outs = []
        for store, use_mirror in zip(stores, (True, False), strict=True):
            group = build_group(
                store,
                rows,
                [torch.tensor([a_len - 1]), torch.tensor([b_len - 1])],
                key_slots,
                mmca,
                heads // KV_HEADS,
            )
            assert not group.query_prefix
            if use_mirror:
                assert mirror.plan(("a", "b"), key_slots)
                group.mirror = mirror
            batch = PagedBatch(store=store, new_slots=new_slots, groups=[group], mmca=mmca)
            outs.append(paged_attention(batch, 0, q, k, v, HEAD_DIM**-0.5))
        assert torch.equal(outs[0][[0, 3]], outs[1][[0, 3]])
    assert (mirror.num_gathers, mirror.num_appends) == (1, 1)
