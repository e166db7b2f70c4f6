"""Paged KV storage and the attention function that reads it, with MMCA modality tags.

Design note. The engine runs the backbone once per step over one flat ragged batch (all chunks
of all scheduled sequences side by side, shape (1, num_tokens)). The backbone's attention calls
dispatch here through transformers' attention registry (`PAGED_ATTENTION`), with the step's
`PagedBatch` passed as a forward keyword. For each layer the new keys and values are written into
their cache slots, then every sequence attends over its own cached positions, gathered by block
table: all single-token decodes as one padded batch, each prompt chunk on its own. The modality
tag of every cached position is kept in a slot-aligned tensor beside the blocks, so MMCA's rule
(image rows within their image; text rows as text softmax + image softmax) holds across chunk
boundaries, even when a chunk splits an image span. The math is `visualchat.model.attention`'s,
so greedy output equals the reference decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from visualchat.model.attention import TEXT, mmca_attention, mmca_masks

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
    """Sequences attended together in one padded call."""

    query_index: torch.Tensor  # (b, q) flat-batch rows of each sequence's queries (padded)
    query_valid: torch.Tensor  # (b, q) bool
    key_slots: torch.Tensor  # (b, k) cache slots of each sequence's positions (padded)
    text_part: torch.Tensor  # (b, 1, q, k) bool
    image_part: torch.Tensor | None  # (b, 1, q, k) bool; None for causal attention


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
    k_tags = store.tags[k_slots].masked_fill(~k_valid, -1)  # (b, k); -1 = never visible
    q_tags = torch.gather(k_tags, 1, q_pos.clamp(min=0))  # (b, q) tags of the query positions
    k_pos = torch.arange(max_k, device=device).expand(b, max_k)
    if mmca:
        text_part, image_part = mmca_masks(q_tags, k_tags, q_pos, k_pos)
    else:
        text_part = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
        image_part = None  # one softmax over everything earlier: a single fused call
    valid = q_valid[:, :, None]
    return AttentionGroup(
        query_index=q_index,
        query_valid=q_valid,
        key_slots=k_slots,
        text_part=(text_part & valid)[:, None],
        image_part=None if image_part is None else (image_part & valid)[:, None],
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
    if paged_batch is None:
        raise ValueError("paged attention runs only inside the engine (paged_batch= missing)")
    store, layer = paged_batch.store, module.layer_idx
    num_heads, head_dim = query.shape[1], query.shape[3]
    # (num_tokens, kv_heads, head_dim) written into this layer's slots
    store.keys[layer][paged_batch.new_slots] = key[0].transpose(0, 1).to(store.keys[layer].dtype)
    store.values[layer][paged_batch.new_slots] = (
        value[0].transpose(0, 1).to(store.keys[layer].dtype)
    )
    scaling = head_dim**-0.5 if scaling is None else scaling
    flat_query = query[0].transpose(0, 1)  # (num_tokens, heads, head_dim)
    out = torch.zeros_like(flat_query)
    for group in paged_batch.groups:
        k = store.keys[layer][group.key_slots].transpose(1, 2)  # (b, kv_heads, k, d)
        v = store.values[layer][group.key_slots].transpose(1, 2)
        b, kv_heads, num_q = k.shape[0], k.shape[1], group.query_index.shape[1]
        shared = num_heads // kv_heads  # query heads per kv head (grouped-query attention)
        # Query head h uses kv head h // shared: fold each kv head's query heads into its rows,
        # so K and V are read once per kv head instead of copied per query head.
        q = flat_query[group.query_index]  # (b, q, heads, d)
        q = q.view(b, num_q, kv_heads, shared, head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(b, kv_heads, shared * num_q, head_dim)  # (b, kv_heads, shared*q, d)
        text_part = group.text_part.repeat(1, 1, shared, 1)  # (b, 1, shared*q, k)
        image_part = group.image_part
        if image_part is not None:
            image_part = image_part.repeat(1, 1, shared, 1)
        attended = mmca_attention(q, k.to(q.dtype), v.to(q.dtype), text_part, image_part, scaling)
        attended = attended.view(b, kv_heads, shared, num_q, head_dim).permute(0, 3, 1, 2, 4)
        rows = group.query_index[group.query_valid]  # (n,)
        out[rows] = attended.reshape(b, num_q, num_heads, head_dim)[group.query_valid]
    return out.unsqueeze(0), None  # (1, num_tokens, heads, head_dim)


def register_paged_attention() -> None:
    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
