"""MMCA masks and attention against hand-written per-row references (loops, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from visualchat.model.attention import (
    MMCA_ATTENTION,
    empty_rows,
    mmca_attention,
    mmca_attention_forward,
    mmca_masks,
    register_mmca,
)

# Two sequences mixing text (0), three images (1, 2, 3), two turns and right padding (-1).
TAGS = torch.tensor(
    [
        [0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0, 3, 3, 0, 0],  # turn 1: images 1, 2; turn 2: image 3
        [0, 1, 1, 0, 0, 0, 0, 0, 2, 2, 2, 0, 0, -1, -1, -1],  # images 1, 2 then padding
    ]
)
NO_IMAGE_PREFIX = 2  # positions 0, 1 of sequence 0 precede every image


def reference_masks(tags: torch.Tensor, num_queries: int | None = None) -> tuple[list, list]:
    """The rule of ARCHITECTURE.md, one (q, k) pair at a time. Queries are the last
    `num_queries` positions (a decode step over a cache)."""
    batch, num_keys = tags.shape
    num_queries = num_keys if num_queries is None else num_queries
    offset = num_keys - num_queries
    text_part = [[[False] * num_keys for _ in range(num_queries)] for _ in range(batch)]
    image_part = [[[False] * num_keys for _ in range(num_queries)] for _ in range(batch)]
    for b in range(batch):
        for i in range(num_queries):
            q = offset + i
            q_tag = int(tags[b, q])
            for k in range(num_keys):
                k_tag = int(tags[b, k])
                if k > q or q_tag == -1 or k_tag == -1:
                    continue  # the future and padding are never visible
                if q_tag > 0:  # an image token sees its own image only
                    image_part[b][i][k] = k_tag == q_tag
                elif k_tag == 0:
                    text_part[b][i][k] = True
                else:  # a text token sees earlier tokens of any image
                    image_part[b][i][k] = True
    return text_part, image_part


def reference_attention(q, k, v, text_part, image_part, scaling, kv_head=None) -> torch.Tensor:
    """Per (batch, head, query) row: softmax over visible text keys + softmax over visible image
    keys, each normalised on its own, in float64. kv_head maps a query head to its kv head."""
    batch, heads, num_queries, dim = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(batch, heads, num_queries, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            g = h if kv_head is None else kv_head(h)
            for i in range(num_queries):
                for part in (text_part, image_part):
                    keys = [j for j, visible in enumerate(part[b][i]) if visible]
                    if not keys:
                        continue  # no visible key: this term is zero
                    scores = [float(q[b, h, i] @ k[b, g, j]) * scaling for j in keys]
                    top = max(scores)
                    weights = [math.exp(s - top) for s in scores]
                    total = sum(weights)
                    for w, j in zip(weights, keys, strict=True):
                        out[b, h, i] += w / total * v[b, g, j]
    return out


def random_qkv(batch, heads, kv_heads, num_queries, num_keys, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, num_queries, dim, generator=generator)
    k = torch.randn(batch, kv_heads, num_keys, dim, generator=generator)
    v = torch.randn(batch, kv_heads, num_keys, dim, generator=generator)
    return q, k, v


def as_tensor(mask: list) -> torch.Tensor:
    return torch.tensor(mask, dtype=torch.bool)


# --- masks ------------------------------------------------------------------------------------


def test_masks_match_reference_for_every_pair() -> None:
    positions = torch.arange(TAGS.shape[1])
    text_part, image_part = mmca_masks(TAGS, TAGS, positions, positions)
    ref_text, ref_image = reference_masks(TAGS)
    assert text_part.shape == image_part.shape == (2, 16, 16)
    assert text_part.dtype == image_part.dtype == torch.bool
    assert torch.equal(text_part, as_tensor(ref_text))
    assert torch.equal(image_part, as_tensor(ref_image))


def test_masks_spot_checks() -> None:
    positions = torch.arange(TAGS.shape[1])
    text_part, image_part = mmca_masks(TAGS, TAGS, positions, positions)
    # Image 2 (positions 7, 8 of sequence 0): position 8 sees 7 and 8 only, nothing of text.
    assert image_part[0, 8].nonzero().flatten().tolist() == [7, 8]
    assert not text_part[0, 8].any()
    # Text position 11 sees images 1 and 2 in its image part, earlier text in its text part.
    assert image_part[0, 11].nonzero().flatten().tolist() == [2, 3, 4, 7, 8]
    assert text_part[0, 11].nonzero().flatten().tolist() == [0, 1, 5, 6, 9, 10, 11]
    # Padding rows see nothing and no row sees padding.
    assert not (text_part[1, 13:] | image_part[1, 13:]).any()
    assert not (text_part[1, :, 13:] | image_part[1, :, 13:]).any()


def test_masks_for_queries_at_the_end_of_a_cache() -> None:
    num_queries = 5
    positions = torch.arange(TAGS.shape[1])
    text_part, image_part = mmca_masks(
        TAGS[:, -num_queries:], TAGS, positions[-num_queries:], positions
    )
    ref_text, ref_image = reference_masks(TAGS, num_queries)
    assert text_part.shape == (2, num_queries, 16)
    assert torch.equal(text_part, as_tensor(ref_text))
    assert torch.equal(image_part, as_tensor(ref_image))


def test_masks_accept_batched_positions() -> None:
    positions = torch.arange(TAGS.shape[1]).expand(2, -1)
    text_part, image_part = mmca_masks(TAGS, TAGS, positions, positions)
    ref_text, ref_image = reference_masks(TAGS)
    assert torch.equal(text_part, as_tensor(ref_text))
    assert torch.equal(image_part, as_tensor(ref_image))


# --- the attention function ---------------------------------------------------------------------


def test_attention_matches_two_softmax_reference() -> None:
    q, k, v = random_qkv(batch=2, heads=3, kv_heads=3, num_queries=16, num_keys=16)
    ref_text, ref_image = reference_masks(TAGS)
    scaling = 0.3
    out = mmca_attention(
        q, k, v, as_tensor(ref_text)[:, None], as_tensor(ref_image)[:, None], scaling
    )
    expected = reference_attention(q, k, v, ref_text, ref_image, scaling)
    assert out.shape == (2, 3, 16, 8)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # Padding rows (no visible key at all) are exactly zero.
    assert torch.equal(out[1, :, 13:], torch.zeros(3, 3, 8))


def test_image_row_is_one_softmax_over_its_own_image() -> None:
    q, k, v = random_qkv(batch=2, heads=1, kv_heads=1, num_queries=16, num_keys=16)
    ref_text, ref_image = reference_masks(TAGS)
    out = mmca_attention(q, k, v, as_tensor(ref_text)[:, None], as_tensor(ref_image)[:, None], 1.0)
    # Sequence 0, position 4 is the last token of image 1 (positions 2, 3, 4).
    weights = torch.softmax(q[0, 0, 4] @ k[0, 0, 2:5].T, dim=-1)
    torch.testing.assert_close(out[0, 0, 4], weights @ v[0, 0, 2:5], atol=1e-6, rtol=1e-5)


def test_text_row_is_sum_of_two_normalised_softmaxes() -> None:
    q, k, v = random_qkv(batch=2, heads=1, kv_heads=1, num_queries=16, num_keys=16)
    ref_text, ref_image = reference_masks(TAGS)
    out = mmca_attention(q, k, v, as_tensor(ref_text)[:, None], as_tensor(ref_image)[:, None], 1.0)
    # Sequence 0, position 15: text keys and the tokens of images 1, 2 and 3.
    text_keys = [0, 1, 5, 6, 9, 10, 11, 14, 15]
    image_keys = [2, 3, 4, 7, 8, 12, 13]
    text_w = torch.softmax(q[0, 0, 15] @ k[0, 0, text_keys].T, dim=-1)
    image_w = torch.softmax(q[0, 0, 15] @ k[0, 0, image_keys].T, dim=-1)
    expected = text_w @ v[0, 0, text_keys] + image_w @ v[0, 0, image_keys]
    torch.testing.assert_close(out[0, 0, 15], expected, atol=1e-6, rtol=1e-5)
    # The total attention mass of a text row with images visible is 2, not 1.
    ones = torch.ones_like(v)
    mass = mmca_attention(
        q, k, ones, as_tensor(ref_text)[:, None], as_tensor(ref_image)[:, None], 1.0
    )
    torch.testing.assert_close(mass[0, 0, 15], torch.full((8,), 2.0))
    torch.testing.assert_close(mass[0, 0, 0], torch.full((8,), 1.0))


def test_text_rows_before_any_image_equal_causal_attention() -> None:
    q, k, v = random_qkv(batch=2, heads=2, kv_heads=2, num_queries=16, num_keys=16)
    # Huge image values: any leak into the text rows before the first image would show.
    v = v.clone()
    v[0, :, 2:5] = 1e6
    ref_text, ref_image = reference_masks(TAGS)
    out = mmca_attention(q, k, v, as_tensor(ref_text)[:, None], as_tensor(ref_image)[:, None], 0.5)
    n = NO_IMAGE_PREFIX
    causal = torch.nn.functional.scaled_dot_product_attention(
        q[:1, :, :n], k[:1, :, :n], v[:1, :, :n], is_causal=True, scale=0.5
    )
    assert not out.isnan().any()
    torch.testing.assert_close(out[:1, :, :n], causal, atol=1e-6, rtol=1e-5)


def test_text_only_sequence_equals_causal_attention() -> None:
    q, k, v = random_qkv(batch=1, heads=2, kv_heads=2, num_queries=6, num_keys=6)
    tags = torch.zeros(1, 6, dtype=torch.long)
    positions = torch.arange(6)
    text_part, image_part = mmca_masks(tags, tags, positions, positions)
    assert not image_part.any()
    out = mmca_attention(q, k, v, text_part[:, None], image_part[:, None], 8**-0.5)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not out.isnan().any()
    torch.testing.assert_close(out, causal, atol=1e-6, rtol=1e-5)


def test_fused_path_matches_explicit_probabilities_in_value_and_gradient() -> None:
    """The SDPA path (two fused calls) against the eager two-softmax sum it replaces, with rows
    that see no key of a part (padding, text before any image), forward and backward."""
    from visualchat.model.attention import _mmca_attention_eager

    q, k, v = random_qkv(batch=2, heads=2, kv_heads=2, num_queries=16, num_keys=16)
    positions = torch.arange(16)
    text_part, image_part = mmca_masks(TAGS, TAGS, positions, positions)
    masks = text_part[:, None], image_part[:, None]
    grads = []
    for attend in (
        lambda *x: mmca_attention(*x, *masks, 0.3),
        lambda *x: _mmca_attention_eager(*x, *masks, 0.3, 0.0),
    ):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = attend(*inputs)
        out.square().sum().backward()
        grads.append((out.detach(), *[t.grad for t in inputs]))
    for fused, eager in zip(*grads, strict=True):
        assert not fused.isnan().any()
        torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-4)


def test_cpu_training_takes_the_explicit_path_with_the_same_result(monkeypatch) -> None:
    """Training on CPU never calls SDPA (its backward is the slow part there); the output is
    the one the fused inference path gives."""
    import visualchat.model.attention as attention

    q, k, v = random_qkv(batch=2, heads=2, kv_heads=2, num_queries=16, num_keys=16)
    positions = torch.arange(16)
    text_part, image_part = mmca_masks(TAGS, TAGS, positions, positions)
    masks = text_part[:, None], image_part[:, None]
    inference = mmca_attention(q, k, v, *masks, 0.3, training=False)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called while training on CPU")

    monkeypatch.setattr(attention, "_masked_sdpa", no_sdpa)
    training = mmca_attention(q, k, v, *masks, 0.3, training=True)
    torch.testing.assert_close(training, inference, atol=1e-5, rtol=1e-4)


# --- the transformers attention function ------------------------------------------------------


class _Module(torch.nn.Module):
    pass


def eval_module() -> torch.nn.Module:
    return _Module().eval()


def test_forward_grouped_query_attention() -> None:
    heads, kv_heads = 4, 2
    q, k, v = random_qkv(batch=2, heads=heads, kv_heads=kv_heads, num_queries=16, num_keys=16)
    out, weights = mmca_attention_forward(
        eval_module(), q, k, v, None, scaling=0.4, token_modality=TAGS
    )
    ref_text, ref_image = reference_masks(TAGS)
    # transformers' repeat_kv: query head h reads kv head h // (heads / kv_heads).
    expected = reference_attention(q, k, v, ref_text, ref_image, 0.4, kv_head=lambda h: h // 2)
    assert weights is None
    assert out.shape == (2, 16, heads, 8)  # (batch, queries, heads, head_dim)
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_forward_default_scaling_is_inverse_sqrt_head_dim() -> None:
    q, k, v = random_qkv(batch=2, heads=2, kv_heads=2, num_queries=16, num_keys=16)
    out, _ = mmca_attention_forward(eval_module(), q, k, v, None, token_modality=TAGS)
    ref_text, ref_image = reference_masks(TAGS)
    expected = reference_attention(q, k, v, ref_text, ref_image, 8**-0.5)
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_forward_decode_queries_over_a_cache() -> None:
    q, k, v = random_qkv(batch=2, heads=2, kv_heads=1, num_queries=16, num_keys=16)
    full, _ = mmca_attention_forward(eval_module(), q, k, v, None, 1.0, token_modality=TAGS)
    last, _ = mmca_attention_forward(
        eval_module(), q[:, :, -3:], k, v, None, 1.0, token_modality=TAGS
    )
    torch.testing.assert_close(last, full[:, -3:], atol=1e-6, rtol=1e-5)


def _padding_case():
    """The backbone's mask hides keys 3 and 4 (text) of sequence 1 from every query."""
    tags = TAGS.clone()
    allowed = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    allowed[1, :, :, 3:5] = False
    ref_text, ref_image = reference_masks(tags)
    for part in (ref_text, ref_image):
        for row in part[1]:
            row[3] = row[4] = False
    return tags, allowed, ref_text, ref_image


def test_forward_with_boolean_padding_mask() -> None:
    tags, allowed, ref_text, ref_image = _padding_case()
    q, k, v = random_qkv(batch=2, heads=2, kv_heads=2, num_queries=16, num_keys=16)
    out, _ = mmca_attention_forward(eval_module(), q, k, v, allowed, 0.5, token_modality=tags)
    expected = reference_attention(q, k, v, ref_text, ref_image, 0.5)
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # The mask changed something: without it the rows of sequence 1 after position 3 differ.
    unmasked, _ = mmca_attention_forward(eval_module(), q, k, v, None, 0.5, token_modality=tags)
    assert (unmasked[1, 5:] - out[1, 5:]).abs().max() > 1e-3


def test_forward_with_additive_float_mask() -> None:
    tags, allowed, ref_text, ref_image = _padding_case()
    q, k, v = random_qkv(batch=2, heads=2, kv_heads=2, num_queries=16, num_keys=16)
    additive = torch.zeros(2, 1, 16, 16).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, _ = mmca_attention_forward(eval_module(), q, k, v, additive, 0.5, token_modality=tags)
    expected = reference_attention(q, k, v, ref_text, ref_image, 0.5)
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    boolean, _ = mmca_attention_forward(eval_module(), q, k, v, allowed, 0.5, token_modality=tags)
    assert torch.equal(out, boolean)


def test_forward_needs_token_modality() -> None:
    q, k, v = random_qkv(batch=1, heads=2, kv_heads=2, num_queries=4, num_keys=4)
    with pytest.raises(ValueError, match=r"MMCA attention needs token_modality="):
        mmca_attention_forward(eval_module(), q, k, v, None, 1.0)


def test_forward_rejects_token_modality_of_the_wrong_length() -> None:
    q, k, v = random_qkv(batch=1, heads=2, kv_heads=2, num_queries=1, num_keys=6)
    tags = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=r"token_modality covers 5 positions but attention sees 6 keys \(cache plus new",
    ):
        mmca_attention_forward(eval_module(), q, k, v, None, 1.0, token_modality=tags)


def test_register_mmca_is_idempotent_and_visible_to_transformers() -> None:
    from transformers import AttentionInterface

    register_mmca()
    register_mmca()
    assert AttentionInterface()[MMCA_ATTENTION] is mmca_attention_forward


def test_empty_rows_names_the_rows_that_see_no_key_or_none() -> None:
    mask = torch.tensor([[True, False], [False, False], [False, True]])  # (q, k)
    assert torch.equal(empty_rows(mask), torch.tensor([[False], [True], [False]]))
    assert empty_rows(mask[[0, 2]]) is None  # every row sees a key: nothing to fill
