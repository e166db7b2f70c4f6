"""Multi-modal causal attention (MMCA), as DeepSpeed-VisualChat defines it.

Design note. Every position carries a modality tag (`token_modality`): 0 for text, k >= 1 for
the k-th image of its sequence, -1 for padding. For a query at position q:

* an image token of image k attends, with one softmax, to positions <= q of image k only: the
  vision tower already related the image's patches to each other, so the language model need
  not mix text into them;
* a text token attends with two softmaxes over the same Q, K, V: one over visible earlier text
  keys and one over visible earlier image keys; the two outputs are added. A row with no visible
  image key contributes zero (never a softmax over an empty row), so with no images MMCA equals
  plain causal attention exactly.

There are no new parameters. The function is registered in transformers' `AttentionInterface`
under `MMCA_ATTENTION`, so any transformers causal LM whose attention dispatches through that
interface (Llama, Qwen2, Mistral, Phi-3, ...) runs MMCA without a forked model file. The model's
forward receives `token_modality=` and transformers hands it to this function untouched.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

MMCA_ATTENTION = "visualchat_mmca"
TEXT = 0  # token_modality tag of a text token
PADDING = -1  # token_modality tag of a padding slot (never attended to)


def mmca_masks(
    query_modality: torch.Tensor,  # (batch, num_queries) tags of the query positions
    key_modality: torch.Tensor,  # (batch, num_keys) tags of every key position
    query_positions: torch.Tensor,  # (batch, num_queries) or (num_queries,) absolute positions
    key_positions: torch.Tensor,  # (batch, num_keys) or (num_keys,) absolute positions
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two boolean masks of MMCA, each (batch, num_queries, num_keys), True = visible.

    Returns (text_part, image_part): which keys enter the text softmax and which the image one.
    """
    if query_positions.dim() == 1:
        query_positions = query_positions.unsqueeze(0)
    if key_positions.dim() == 1:
        key_positions = key_positions.unsqueeze(0)
    causal = key_positions[:, None, :] <= query_positions[:, :, None]  # (b|1, q, k)
    q_tag = query_modality[:, :, None]  # (b, q, 1)
    k_tag = key_modality[:, None, :]  # (b, 1, k)
    is_text_query = q_tag == TEXT
    text_part = causal & is_text_query & (k_tag == TEXT)
    text_sees_image = is_text_query & (k_tag > 0)
    image_sees_own_image = (q_tag > 0) & (k_tag == q_tag)
    image_part = causal & (text_sees_image | image_sees_own_image)
    return text_part, image_part


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over visible keys; rows with no visible key are all zeros instead of NaN."""
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.masked_fill(_sees_no_key(mask), 0.0)


def mmca_attention(
    query: torch.Tensor,  # (batch, heads, num_queries, head_dim)
    key: torch.Tensor,  # (batch, heads, num_keys, head_dim)
    value: torch.Tensor,  # (batch, heads, num_keys, head_dim)
    text_part: torch.Tensor,  # (batch, 1 | heads, num_queries, num_keys) bool (see `empty`)
    image_part: torch.Tensor | None,  # same shape, or None: no image keys anywhere (causal)
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    empty: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Sum of the text-softmax and image-softmax outputs: (batch, heads, num_queries, head_dim).

    Each softmax is one fused `scaled_dot_product_attention` call with its own mask (two calls
    for MMCA, one when `image_part` is None), so no (q, k) probability matrix is kept per head
    for backward and the CPU flash kernel does the work; rows that see no key of a part get zero
    from it (a fully masked SDPA row is NaN, replaced).

    Training on CPU takes the explicit-probability path instead (one score matmul shared by
    both softmaxes): torch's CPU flash-attention backward is the slow part of a training step
    there (see training.trainer.use_training_attention for the causal kernel's figures).

    `empty`: the rows of each part that see no key (`empty_rows`), when the caller worked them out
    once for many calls (the engine, once per pass for all layers); None: found here. With
    `empty` given (and not training) the parts may also be additive masks (0 / -inf) in the
    query's dtype, which SDPA would otherwise make from the booleans in every call."""
    if training and (dropout > 0.0 or query.device.type == "cpu"):
        return _mmca_attention_eager(query, key, value, text_part, image_part, scaling, dropout)
    if empty is None:
        empty = (_sees_no_key(text_part), None if image_part is None else _sees_no_key(image_part))
    out = _masked_sdpa(query, key, value, text_part, scaling, empty[0])
    if image_part is not None:
        out = out + _masked_sdpa(query, key, value, image_part, scaling, empty[1])
    return out


def empty_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """The rows of an attention mask (..., q, k) that see no key, as (..., q, 1) bool; None when
    every row sees one, so the fill can be skipped (decode rows always see themselves)."""
    empty = _sees_no_key(mask)
    return empty if bool(empty.any()) else None


def _sees_no_key(mask: torch.Tensor) -> torch.Tensor:
    return ~mask.any(dim=-1, keepdim=True)  # (..., q, 1) True where a row sees no key


def _masked_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    empty: torch.Tensor | None,  # (..., q, 1) rows with no visible key; None: there are none
) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling
    )  # (b, h, q, d); NaN on rows with no visible key
    return out if empty is None else out.masked_fill(empty, 0.0)


def _mmca_attention_eager(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_part: torch.Tensor,
    image_part: torch.Tensor | None,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """The same sum with explicit probabilities (attention dropout; CPU training)."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling  # (b, h, q, k)
    probs = _masked_softmax(scores, text_part)
    if image_part is not None:
        probs = probs + _masked_softmax(scores, image_part)
    if dropout > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    probs = probs.to(value.dtype)
    return torch.matmul(probs, value)


def _repeat_kv(states: torch.Tensor, num_groups: int) -> torch.Tensor:
    # (b, kv_heads, k, d) -> (b, kv_heads * num_groups, k, d) for grouped-query attention
    if num_groups == 1:
        return states
    return states.repeat_interleave(num_groups, dim=1)


def mmca_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (batch, heads, num_queries, head_dim)
    key: torch.Tensor,  # (batch, kv_heads, num_keys, head_dim), cache included
    value: torch.Tensor,  # (batch, kv_heads, num_keys, head_dim)
    attention_mask: torch.Tensor | None,  # (batch, 1, num_queries, num_keys) bool or additive
    scaling: float | None = None,
    dropout: float = 0.0,
    token_modality: torch.Tensor | None = None,  # (batch, >= num_keys) tags, whole sequence
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; returns (batch, num_queries, heads, head_dim)."""
    if token_modality is None:
        raise ValueError(
            "MMCA attention needs token_modality= (batch, num_keys) passed to the model forward; "
            "use attention='causal' for a plain language model"
        )
    num_queries, num_keys = query.shape[2], key.shape[2]
    if token_modality.shape[-1] < num_keys:
        raise ValueError(
            f"token_modality covers {token_modality.shape[-1]} positions but attention sees "
            f"{num_keys} keys (cache plus new tokens)"
        )
    # A sliding-window layer caches only the most recent keys: they are the tail of the sequence.
    token_modality = token_modality[:, token_modality.shape[-1] - num_keys :]
    num_groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, num_groups), _repeat_kv(value, num_groups)
    key_positions = torch.arange(num_keys, device=query.device)
    query_positions = key_positions[num_keys - num_queries :]
    text_part, image_part = mmca_masks(
        token_modality[:, num_keys - num_queries :], token_modality, query_positions, key_positions
    )
    text_part, image_part = text_part[:, None], image_part[:, None]  # (b, 1, q, k)
    if attention_mask is not None:
        # Padding (and any other restriction) from the backbone's own mask.
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        allowed = allowed[..., :num_keys]
        text_part, image_part = text_part & allowed, image_part & allowed
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    training = bool(getattr(module, "training", False))
    out = mmca_attention(query, key, value, text_part, image_part, scaling, dropout, training)
    return out.transpose(1, 2).contiguous(), None


def register_mmca() -> None:
    """Make `attn_implementation="visualchat_mmca"` known to transformers (idempotent)."""
    AttentionInterface.register(MMCA_ATTENTION, mmca_attention_forward)
    # The backbone builds its causal/padding mask as for SDPA (boolean, True = attend); MMCA
    # narrows it further with the modality tags.
    AttentionMaskInterface.register(MMCA_ATTENTION, sdpa_mask)
