"""Paged KV storage and the attention function that reads it, with MMCA modality tags.

Design note. The engine runs the backbone once per step over one flat ragged batch (all chunks
of all scheduled sequences side by side, shape (1, num_tokens)). The backbone's attention calls
dispatch here through transformers' attention registry (`PAGED_ATTENTION`), with the step's
`PagedBatch` passed as a forward keyword; the engine's own forward of Llama-family decoders
(`lean_forward`) calls `paged_attention` directly. For each layer the new keys and values are
written into their cache slots, then every sequence attends over its own cached positions,
gathered by block table: all single-token decodes as one padded batch, each prompt chunk on its
own. The modality tag of every cached position is kept in a slot-aligned tensor beside the
blocks, so MMCA's rule (image rows within their image; text rows as text softmax + image
softmax) holds across chunk boundaries, even when a chunk splits an image span. The math is
`visualchat.model.attention`'s, so greedy output equals the reference decoder's. On a CPU
float32 cache a decode group attends in native code instead, each sequence reading its own keys
straight from their slots (`native_decode_attention`): no gather, no padding to the longest
context. Elsewhere (no compiler, another device or dtype) a decode group may read its keys from
the decode mirror instead of gathering them (`decode_mirror`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from serving.engine import block_kernels
from serving.engine.decode_mirror import DecodeMirror
from visualchat.model.attention import PADDING, TEXT, empty_rows, mmca_attention, mmca_masks

PAGED_ATTENTION = "visualchat_paged"


class PagedKVStore:
    """K/V of every layer in slot-major tensors, plus the modality tag of every slot."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.tags = torch.full((num_slots,), TEXT, dtype=torch.long, device=device)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class AttentionGroup:
    """Sequences attended together in one padded call, with everything that is the same in
    every layer worked out once per step (the per-layer work is gathers and the SDPA calls)."""

    query_index: torch.Tensor  # (b * q,) flat-batch row of each padded query (0 for padding)
    query_prefix: bool  # query_index is 0, 1, ..., b * q - 1 (a decode group at the front)
    num_queries: int  # q: queries per sequence after padding
    key_slots: torch.Tensor  # (b * k,) cache slot of each padded key position
    num_keys: int  # k
    # Masks with each kv head's query heads folded into the query rows (see the forward), as
    # additive masks in the cache's dtype (0 visible, -inf not): SDPA would turn a boolean mask
    # into this in every call, i.e. in every layer.
    text_part: torch.Tensor | None  # (b, 1, shared * q, k); None: a native group (below)
    image_part: torch.Tensor | None  # same shape; None for causal attention
    # Rows of each part that see no key, (b, 1, shared * q, 1); None where there are none.
    empty: tuple[torch.Tensor | None, torch.Tensor | None]
    out_rows: torch.Tensor  # (n,) flat-batch rows of the real queries
    out_index: torch.Tensor | None  # (n,) their places among the b * q padded ones; None: all
    rows_in_order: bool  # out_rows is 0, 1, ..., n - 1
    # A decode group's keys and values kept gathered between steps (see decode_mirror); None:
    # gathered from the slots in every layer.
    mirror: DecodeMirror | None = None
    # A decode group that the native attention reads straight from the slots (see
    # `native_decode_attention`): which softmax each key enters, (b, k) uint8 (0 none, 1 text,
    # 2 image), and each sequence's key count, (b,) int64. None: the gather and SDPA path.
    native_parts: torch.Tensor | None = None
    native_counts: torch.Tensor | None = None


@dataclass
class PagedBatch:
    store: PagedKVStore
    new_slots: torch.Tensor  # (num_tokens,) slot of every new token
    groups: list[AttentionGroup] = field(default_factory=list)
    mmca: bool = True  # False: plain causal attention over the same cache


def build_group(
    store: PagedKVStore,
    query_rows: list[torch.Tensor],  # per sequence: (q_i,) flat-batch rows of its new tokens
    query_positions: list[torch.Tensor],  # per sequence: (q_i,) absolute positions
    key_slots: list[torch.Tensor],  # per sequence: (k_i,) slots of positions 0..k_i-1
    mmca: bool,
    shared: int,  # query heads per kv head (grouped-query attention)
    native: bool = False,  # a group of one query per sequence attends natively (see above)
) -> AttentionGroup:
    b = len(query_rows)
    max_q = max(len(r) for r in query_rows)
    max_k = max(len(s) for s in key_slots)
    device = store.tags.device
    q_index = torch.zeros(b, max_q, dtype=torch.long, device=device)
    q_valid = torch.zeros(b, max_q, dtype=torch.bool, device=device)
    q_pos = torch.full((b, max_q), -1, dtype=torch.long, device=device)
    k_slots = torch.zeros(b, max_k, dtype=torch.long, device=device)
    k_valid = torch.zeros(b, max_k, dtype=torch.bool, device=device)
    for i, (rows, positions, slots) in enumerate(
        zip(query_rows, query_positions, key_slots, strict=True)
    ):
        q_index[i, : len(rows)] = rows
        q_valid[i, : len(rows)] = True
        q_pos[i, : len(rows)] = positions
        k_slots[i, : len(slots)] = slots
        k_valid[i, : len(slots)] = True
    k_tags = store.tags[k_slots].masked_fill(~k_valid, PADDING)  # (b, k)
    out_rows = q_index[q_valid]
    if native and max_q == 1:
        # The parts as codes per key; SDPA's folded additive masks are not needed.
        return AttentionGroup(
            query_index=q_index.view(-1),
            query_prefix=torch.equal(q_index.view(-1), torch.arange(b, device=device)),
            num_queries=1,
            key_slots=k_slots.view(-1),
            num_keys=max_k,
            text_part=None,
            image_part=None,
            empty=(None, None),
            out_rows=out_rows,
            out_index=None,
            rows_in_order=torch.equal(out_rows, torch.arange(b, device=device)),
            native_parts=key_parts(k_tags, q_pos[:, 0], mmca),
            native_counts=k_valid.sum(1),
        )
    q_tags = torch.gather(k_tags, 1, q_pos.clamp(min=0))  # (b, q) tags of the query positions
    k_pos = torch.arange(max_k, device=device).expand(b, max_k)
    if mmca:
        text_part, image_part = mmca_masks(q_tags, k_tags, q_pos, k_pos)
    else:
        text_part = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
        image_part = None  # one softmax over everything earlier: a single fused call
    valid = q_valid[:, :, None]

    def folded(part: torch.Tensor) -> torch.Tensor:  # (b, q, k) -> (b, 1, shared * q, k)
        return (part & valid)[:, None].repeat(1, 1, shared, 1)

    all_valid = bool(q_valid.all())
    text_part = folded(text_part)
    image_part = None if image_part is None else folded(image_part)
    empty = (empty_rows(text_part), None if image_part is None else empty_rows(image_part))
    dtype = store.keys[0].dtype

    def additive(part: torch.Tensor) -> torch.Tensor:  # True -> 0, False -> -inf
        return torch.zeros(part.shape, dtype=dtype, device=device).masked_fill_(~part, -torch.inf)

    return AttentionGroup(
        query_index=q_index.view(-1),
        query_prefix=torch.equal(q_index.view(-1), torch.arange(b * max_q, device=device)),
        num_queries=max_q,
        key_slots=k_slots.view(-1),
        num_keys=max_k,
        text_part=additive(text_part),
        image_part=None if image_part is None else additive(image_part),
        empty=empty,
        out_rows=out_rows,
        out_index=None if all_valid else q_valid.view(-1).nonzero().squeeze(1),
        rows_in_order=torch.equal(out_rows, torch.arange(len(out_rows), device=device)),
    )


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, heads, num_tokens, head_dim) the flat ragged batch
    key: torch.Tensor,  # (1, kv_heads, num_tokens, head_dim)
    value: torch.Tensor,  # (1, kv_heads, num_tokens, head_dim)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_batch: PagedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over `paged_attention`."""
    if paged_batch is None:
        raise ValueError("paged attention runs only inside the engine (paged_batch= missing)")
    scaling = query.shape[3] ** -0.5 if scaling is None else scaling
    out = paged_attention(
        paged_batch,
        module.layer_idx,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scaling,
    )
    return out.unsqueeze(0), None  # (1, num_tokens, heads, head_dim)


def paged_attention(
    batch: PagedBatch,
    layer: int,
    query: torch.Tensor,  # (num_tokens, heads, head_dim) the flat ragged batch
    key: torch.Tensor,  # (num_tokens, kv_heads, head_dim)
    value: torch.Tensor,  # (num_tokens, kv_heads, head_dim)
    scaling: float,
) -> torch.Tensor:
    """Write the pass's keys and values into their slots of `layer`, then attend every query
    over its sequence's cached positions: (num_tokens, heads, head_dim)."""
    store = batch.store
    num_heads, head_dim = query.shape[1], query.shape[2]
    keys, values = store.keys[layer], store.values[layer]  # (slots, kv_heads, head_dim)
    keys.index_copy_(0, batch.new_slots, key)  # index_copy_ casts to the cache's dtype
    values.index_copy_(0, batch.new_slots, value)
    kv_heads = keys.shape[1]
    shared = num_heads // kv_heads  # query heads per kv head (grouped-query attention)
    outputs = []  # (group, attended rows) per group
    for group in batch.groups:
        if group.native_parts is not None:
            attended = native_decode_attention(group, query, keys, values, scaling)
            outputs.append((group, attended))
            continue
        b, num_q, num_k = group.text_part.shape[0], group.num_queries, group.num_keys
        if group.mirror is not None:  # one query per sequence: its key and value are new
            rows = slice(0, b) if group.query_prefix else group.query_index
            k, v = group.mirror.keys_values(
                layer, keys, values, key[rows].to(keys.dtype), value[rows].to(keys.dtype), num_k
            )  # (b, kv_heads, k, d)
        else:
            k = keys.index_select(0, group.key_slots).view(b, num_k, kv_heads, head_dim)
            v = values.index_select(0, group.key_slots).view(b, num_k, kv_heads, head_dim)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (b, kv_heads, k, d)
        if k.dtype != query.dtype:
            k, v = k.to(query.dtype), v.to(query.dtype)
        # Query head h uses kv head h // shared: fold each kv head's query heads into its rows,
        # so K and V are read once per kv head instead of copied per query head.
        # (b * q, heads, d); a decode group's rows lead the batch in order: a view of them
        prefix = group.query_prefix
        q = query[: b * num_q] if prefix else query.index_select(0, group.query_index)
        q = q.view(b, num_q, kv_heads, shared, head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(b, kv_heads, shared * num_q, head_dim)  # (b, kv_heads, shared*q, d)
        attended = mmca_attention(
            q, k, v, group.text_part, group.image_part, scaling, empty=group.empty
        )
        attended = attended.view(b, kv_heads, shared, num_q, head_dim).permute(0, 3, 1, 2, 4)
        attended = attended.reshape(b * num_q, num_heads, head_dim)
        if group.out_index is not None:
            attended = attended.index_select(0, group.out_index)  # (n, heads, d)
        outputs.append((group, attended))
    num_tokens = query.shape[0]
    if len(outputs) == 1 and outputs[0][0].rows_in_order and len(outputs[0][1]) == num_tokens:
        return outputs[0][1]  # e.g. one decode group: already in row order
    out = torch.zeros_like(query)
    for group, attended in outputs:
        out.index_copy_(0, group.out_rows, attended)
    return out  # (num_tokens, heads, head_dim)


def native_attention_available(store: PagedKVStore) -> bool:
    """Whether decode groups over this store can attend through `native_decode_attention`:
    a CPU float32 cache, and the native library built (block_kernels logs why not)."""
    keys = store.keys[0]
    return keys.device.type == "cpu" and keys.dtype == torch.float32 and block_kernels.available()


NO_PART, TEXT_PART, IMAGE_PART = 0, 1, 2  # native attention's codes (decode_pass.cpp)


def key_parts(
    key_tags: torch.Tensor,  # (b, k) modality tag of each key position (PADDING: no key)
    positions: torch.Tensor,  # (b,) each row's one query position p (its tag is key_tags[:, p])
    mmca: bool,
) -> torch.Tensor:
    """Which softmax each key of a one-query row enters, as native attention's codes: (b, k)
    uint8, NO_PART / TEXT_PART / IMAGE_PART. Keys after p enter none, whatever their tags. MMCA's
    rule is `mmca_masks`'; without MMCA every key up to p is text (one softmax). Both native
    paths take their parts from here: the decode pass (native_decode.py) and the decode groups
    of the lean forward (`build_group`)."""
    k = key_tags.shape[1]
    key_pos = torch.arange(k, device=key_tags.device)  # (k,)
    query_pos = positions[:, None]  # (b, 1)
    if not mmca:
        visible = (key_pos[None, :] <= query_pos) & (key_tags != PADDING)  # (b, k)
        return visible.to(torch.uint8)
    query_tags = key_tags.gather(1, query_pos)  # (b, 1)
    text_part, image_part = mmca_masks(query_tags, key_tags, query_pos, key_pos)  # (b, 1, k)
    # The parts are disjoint: a key is text or image, never both.
    return (text_part[:, 0] * TEXT_PART + image_part[:, 0] * IMAGE_PART).to(torch.uint8)


def native_decode_attention(
    group: AttentionGroup,
    query: torch.Tensor,  # (num_tokens, heads, head_dim) the flat ragged batch
    keys: torch.Tensor,  # (slots, kv_heads, head_dim) the layer's store
    values: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """A decode group's attention read straight from the slots by the native library
    (native/decode_pass.cpp, the native decode pass's own attention): (b, heads, head_dim).

    Why. The torch path gathers every sequence's keys and values into a batch padded to the
    longest context, in every layer; with many sequences of mixed lengths (a busy server: short
    chats beside a long document's reply) the copies and the padded SDPA cost most of a step.
    Here each (sequence, query head) reads its own keys once from their slots. Same math as
    `mmca_attention`, in float32, its sums in another order (results agree to ~1e-6)."""
    b, heads, head_dim = group.native_parts.shape[0], query.shape[1], query.shape[2]
    kv_heads = keys.shape[1]
    if query.dtype != torch.float32 or query.stride(2) != 1 or query.stride(1) != head_dim:
        query = query.to(torch.float32).contiguous()
    rows = group.query_index  # (b,) the query row of each sequence
    out = torch.empty(b, heads, head_dim, dtype=torch.float32)
    block_kernels.library().vc_decode_attention(
        query.data_ptr(),
        rows.data_ptr(),
        query.stride(0),
        b,
        keys.data_ptr(),
        values.data_ptr(),
        group.key_slots.data_ptr(),
        group.num_keys,
        group.native_counts.data_ptr(),
        group.native_parts.data_ptr(),
        heads,
        kv_heads,
        head_dim,
        scaling,
        out.data_ptr(),
    )
    return out


def register_paged_attention() -> None:
    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
