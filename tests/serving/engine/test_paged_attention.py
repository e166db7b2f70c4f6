"""Native attention for decode groups: read straight from the cache slots, it gives what the
gather-and-SDPA path gives (MMCA's two softmaxes, image queries within their image, causal
attention, grouped-query heads, strided queries), and an engine using it computes the same
logits pass for pass as one without it."""

from __future__ import annotations

import pytest
import torch
from engine_testing import GREEDY, WORKLOAD, make_engine, record_logits, run_engine

from serving.engine import block_kernels
from serving.engine import paged_attention as paged
from serving.engine.paged_attention import PagedBatch, PagedKVStore, build_group
from visualchat.model.attention import PADDING

# The parts (build_group, key_parts) are torch alone; only attending natively needs the library.
needs_native = pytest.mark.skipif(
    not block_kernels.available(), reason="native attention needs a C++ compiler (g++)"
)

SLOTS = 512


def random_store(kv_heads: int, head_dim: int, seed: int = 0) -> PagedKVStore:
    store = PagedKVStore(1, SLOTS, kv_heads, head_dim, torch.float32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    store.keys[0].copy_(torch.randn(SLOTS, kv_heads, head_dim, generator=generator))
    store.values[0].copy_(torch.randn(SLOTS, kv_heads, head_dim, generator=generator))
    return store


QUERY_ROWS = [4, 0, 5, 2]  # of a 6-row pass: not in order, and rows 1 and 3 are someone else's


def decode_sequences(store: PagedKVStore) -> tuple[list, list, list]:
    """Four sequences of one new token each, in scattered slots, of 1 to 40 positions: text
    only; text with an image span (a text query after it); a query inside its image span; and
    one whose only key is its own. Returns per sequence (query row, position, key slots)."""
    free = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(1))
    layouts = [
        [0] * 23,
        [0] * 5 + [1] * 8 + [0] * 4 + [2] * 8 + [0] * 15,  # 40 positions, two images
        [0] * 6 + [1] * 5,  # the last position is image 1's: an image query
        [0],
    ]
    rows, positions, key_slots, start = [], [], [], 0
    for i, tags in enumerate(layouts):
        slots = free[start : start + len(tags)]
        start += len(tags)
        store.tags[slots] = torch.tensor(tags)
        rows.append(torch.tensor([QUERY_ROWS[i]]))
        positions.append(torch.tensor([len(tags) - 1]))
        key_slots.append(slots)
    return rows, positions, key_slots


@needs_native
@pytest.mark.parametrize("mmca", [True, False])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 8), (6, 3, 64), (2, 2, 16)])
def test_native_decode_groups_attend_as_the_gather_path_does(
    mmca: bool, heads: int, kv_heads: int, head_dim: int
) -> None:
    store = random_store(kv_heads, head_dim)
    rows, positions, key_slots = decode_sequences(store)
    generator = torch.Generator().manual_seed(2)
    # q, k and v side by side in one row, as the lean forward's views of its qkv product are:
    # the queries' rows are strided, not contiguous.
    qkv = torch.randn(6, (heads + 2 * kv_heads) * head_dim, generator=generator)
    query = qkv[:, : heads * head_dim].view(6, heads, head_dim)
    # Every row's key and value are already in their slots; rows 1 and 3 write to spare ones.
    new_slots = torch.zeros(6, dtype=torch.long)
    new_slots[QUERY_ROWS] = torch.stack([s[-1] for s in key_slots])
    new_slots[[1, 3]] = torch.tensor([SLOTS - 1, SLOTS - 2])
    key, value = store.keys[0][new_slots].clone(), store.values[0][new_slots].clone()
    out = {}
    for native in (True, False):
        group = build_group(store, rows, positions, key_slots, mmca, heads // kv_heads, native)
        assert (group.native_parts is not None) == native
        batch = PagedBatch(store=store, new_slots=new_slots, groups=[group], mmca=mmca)
        out[native] = paged.paged_attention(batch, 0, query, key, value, head_dim**-0.5)
    assert out[True].shape == (6, heads, head_dim)
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
    # The rows differ from each other: the test would see rows mixed up.
    assert not torch.allclose(out[True][4], out[True][0])


def test_the_parts_follow_mmca() -> None:
    store = random_store(2, 8)
    rows, positions, key_slots = decode_sequences(store)
    group = build_group(store, rows, positions, key_slots, True, 2, native=True)
    parts = group.native_parts  # (4, 40)
    assert group.native_counts.tolist() == [23, 40, 11, 1]
    assert parts[1, :40].tolist() == [1] * 5 + [2] * 8 + [1] * 4 + [2] * 8 + [1] * 15
    assert parts[2, :11].tolist() == [0] * 6 + [2] * 5  # an image query: its own image only
    assert parts[3, :1].tolist() == [1] and not parts[3, 1:].any()  # padding enters nothing
    causal = build_group(store, rows, positions, key_slots, False, 2, native=True)
    assert causal.native_parts[1, :40].tolist() == [1] * 40


def expected_part(tags: list[int], p: int, t: int, mmca: bool) -> int:
    """MMCA's rule for key t of a query at p, written out per key: 0 none, 1 text, 2 image."""
    if t > p or tags[t] == PADDING:
        return 0
    if not mmca:
        return 1
    query, key = tags[p], tags[t]
    if query == 0:  # a text query: text keys in one softmax, image keys in the other
        return 1 if key == 0 else 2
    return 2 if key == query else 0  # an image query: its own image only


@pytest.mark.parametrize("mmca", [True, False])
def test_key_parts_follow_the_rule_key_by_key(mmca: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    tags = torch.randint(-1, 4, (6, 30), generator=generator)  # padding, text, images 1-3
    positions = torch.tensor([0, 7, 29, 12, 3, 20])
    tags[torch.arange(6), positions] = torch.tensor([0, 2, 0, 1, 0, 3])  # text and image queries
    parts = paged.key_parts(tags, positions, mmca)
    assert parts.dtype == torch.uint8
    for r, p in enumerate(positions.tolist()):
        row = tags[r].tolist()
        assert parts[r].tolist() == [expected_part(row, p, t, mmca) for t in range(30)], r


def test_groups_of_longer_chunks_keep_the_gather_path() -> None:
    store = random_store(2, 8)
    rows = [torch.tensor([0, 1, 2])]
    group = build_group(store, rows, [torch.arange(3)], [torch.arange(3)], True, 2, native=True)
    assert group.native_parts is None and group.text_part is not None


@needs_native
@pytest.mark.parametrize("attention", ["mmca", "causal"])
def test_an_engine_with_native_attention_computes_the_same_logits(
    attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pass for pass against the same engine gathering for SDPA: the same passes and greedy
    tokens, logits equal to float32 rounding; decode groups beside prompt chunks included."""
    calls = []
    real = paged.native_decode_attention

    def counting(group, *args):
        calls.append(group.native_parts.shape[0])
        return real(group, *args)

    monkeypatch.setattr(paged, "native_decode_attention", counting)
    passes = {}
    for native in (True, False):
        engine = make_engine(attention, max_num_batched_tokens=13, native_attention=native)
        assert engine.runner.native_attention == native
        passes[native] = record_logits(engine)
        run_engine(engine, [(c, GREEDY) for c in WORKLOAD[:6]])
        if native:
            assert engine.runner.mirror.num_gathers == 0  # nothing for the mirror to hold
    layers = engine.model.language_model.config.num_hidden_layers
    assert len(calls) >= 10 * layers and max(calls) >= 3
    assert len(passes[True]) == len(passes[False])
    for i, (ours, theirs) in enumerate(zip(passes[True], passes[False], strict=True)):
        assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist(), f"pass {i}"
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"pass {i}")
