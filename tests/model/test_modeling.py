"""VisualChatModel forward: MMCA vs causal vs the bare backbone, image isolation, causality,
incremental decoding over a DynamicCache, splicing checks and batching with padding."""

from __future__ import annotations

import pytest
import torch
from factories import (
    ARCHS,
    make_backbone,
    make_backbone_config,
    make_config,
    make_image,
    make_model,
    make_tokenizer,
)
from transformers import AutoModelForCausalLM, DynamicCache

from visualchat.model.loading import build_model
from visualchat.model.modeling import VisualChatConfig, VisualChatModel
from visualchat.model.vision import VisionConfig

NUM_IMAGE_TOKENS = 16
IMAGE = "image"  # marks an image slot in `layout`


def layout(*pieces: list[int] | str, image_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, token_modality), each (1, seq): lists are text ids, IMAGE an image slot."""
    ids: list[int] = []
    tags: list[int] = []
    number = 0
    for piece in pieces:
        if piece == IMAGE:
            number += 1
            ids += [image_token_id] * NUM_IMAGE_TOKENS
            tags += [number] * NUM_IMAGE_TOKENS
        else:
            ids += list(piece)
            tags += [0] * len(piece)
    return torch.tensor([ids]), torch.tensor([tags])


def pixels(model: VisualChatModel, *colors: tuple[int, int, int]) -> torch.Tensor:
    transform = model.vision.image_transform()
    return torch.stack([transform(make_image(color)) for color in colors])  # (n, 3, 32, 32)


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
TEXT_A, TEXT_B, TEXT_C = [5, 17, 42, 99], [7, 8, 9], [120, 33, 250, 64, 11]
# text A (0-3) | image 1 (4-19) | text B (20-22) | image 2 (23-38) | text C (39-43)
IMAGE1 = slice(4, 20)
BEFORE_IMAGE2 = slice(0, 23)
IMAGE2 = slice(23, 39)
AFTER_IMAGE2 = slice(39, 44)


@pytest.fixture(scope="module")
def mmca_model() -> VisualChatModel:
    return make_model("mmca")[0]


@torch.no_grad()
def logits_of(model, ids, tags, pixel_values=None, **kwargs) -> torch.Tensor:
    return model(ids, tags, pixel_values=pixel_values, **kwargs).logits


# --- no images: MMCA == causal == the bare backbone ---------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_without_images_mmca_equals_causal_equals_backbone(arch: str) -> None:
    mmca, tokenizer = make_model("mmca", arch=arch)
    causal, _ = make_model("causal", arch=arch)
    bare = make_backbone(tokenizer, arch=arch)
    assert bare.config._attn_implementation == "sdpa"
    assert mmca.language_model.config._attn_implementation == "visualchat_mmca"
    assert causal.language_model.config._attn_implementation == "sdpa"
    state = bare.state_dict()
    for key, value in mmca.language_model.state_dict().items():
        assert torch.equal(value, state[key]), key
    ids = torch.tensor([[3, 17, 42, 99, 120, 33, 250, 64, 11, 5, 200]])
    tags = torch.zeros_like(ids)
    with torch.no_grad():
        expected = bare(ids).logits
    assert expected.shape == (1, 11, len(tokenizer))
    torch.testing.assert_close(logits_of(mmca, ids, tags), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(causal, ids, tags), expected, atol=1e-5, rtol=1e-5)


def test_config_rejects_unknown_attention() -> None:
    with pytest.raises(ValueError, match=r"attention must be 'mmca' or 'causal', got 'flash'"):
        VisualChatConfig(vision=VisionConfig(custom={"image_size": 32}), attention="flash")


def test_config_default_system_round_trips_and_must_be_text() -> None:
    vision = VisionConfig(custom={"image_size": 32})
    config = VisualChatConfig(vision=vision, default_system="")
    assert VisualChatConfig.from_dict(config.to_dict()).default_system == ""
    old = {k: v for k, v in config.to_dict().items() if k != "default_system"}
    assert VisualChatConfig.from_dict(old).default_system is None  # configs written before it
    with pytest.raises(ValueError, match="default_system must be a string or None, got 3"):
        VisualChatConfig(vision=vision, default_system=3)


def test_set_attention_switches_the_backbone() -> None:
    model, _ = make_model("mmca")
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B)
    pv = pixels(model, RED)
    mmca = logits_of(model, ids, tags, pv)
    model.set_attention("causal")
    assert model.config.attention == "causal"
    assert model.language_model.config._attn_implementation == "sdpa"
    causal = logits_of(model, ids, tags, pv)
    model.set_attention("mmca")
    torch.testing.assert_close(logits_of(model, ids, tags, pv), mmca, atol=1e-6, rtol=0)
    assert (causal - mmca).abs().max() > 1e-3
    with pytest.raises(ValueError, match="attention must be 'mmca' or 'causal'"):
        model.set_attention("eager")  # type: ignore[arg-type]


# --- with images ------------------------------------------------------------------------------


def test_with_images_mmca_differs_from_causal(mmca_model: VisualChatModel) -> None:
    causal, _ = make_model("causal")
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    pv = pixels(mmca_model, RED, GREEN)
    mmca_logits = logits_of(mmca_model, ids, tags, pv)
    causal_logits = logits_of(causal, ids, tags, pv)
    assert mmca_logits.shape == (1, 44, mmca_model.language_model.config.vocab_size)
    # Before the first image both are plain causal attention over the same weights.
    torch.testing.assert_close(mmca_logits[:, :4], causal_logits[:, :4], atol=1e-5, rtol=1e-5)
    assert (mmca_logits[:, 4:] - causal_logits[:, 4:]).abs().amax(-1).min() > 1e-4


def test_changing_image_2_is_causal_and_isolated(mmca_model: VisualChatModel) -> None:
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    base = logits_of(mmca_model, ids, tags, pixels(mmca_model, RED, GREEN))
    other = logits_of(mmca_model, ids, tags, pixels(mmca_model, RED, BLUE))
    # Positions before image 2 (image 1's tokens included) do not see it.
    torch.testing.assert_close(other[:, BEFORE_IMAGE2], base[:, BEFORE_IMAGE2], atol=1e-6, rtol=0)
    # Image 2's own tokens and every later text token change.
    assert (other[:, IMAGE2] - base[:, IMAGE2]).abs().amax(-1).min() > 1e-4
    assert (other[:, AFTER_IMAGE2] - base[:, AFTER_IMAGE2]).abs().amax(-1).min() > 1e-4


def test_image_tokens_only_see_their_own_image(mmca_model: VisualChatModel) -> None:
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    base = logits_of(mmca_model, ids, tags, pixels(mmca_model, RED, GREEN))
    # Change image 1 and the text before image 2: image 2's tokens see neither.
    other_ids = ids.clone()
    other_ids[0, :4] = torch.tensor([250, 251, 252, 253])
    other_ids[0, 20:23] = torch.tensor([60, 61, 62])
    other = logits_of(mmca_model, other_ids, tags, pixels(mmca_model, BLUE, GREEN))
    torch.testing.assert_close(other[:, IMAGE2], base[:, IMAGE2], atol=1e-5, rtol=1e-5)
    assert (other[:, IMAGE1] - base[:, IMAGE1]).abs().amax(-1).min() > 1e-4
    assert (other[:, AFTER_IMAGE2] - base[:, AFTER_IMAGE2]).abs().amax(-1).min() > 1e-4
    # Under causal attention the same change does reach image 2's tokens.
    causal, _ = make_model("causal")
    base_c = logits_of(causal, ids, tags, pixels(causal, RED, GREEN))
    other_c = logits_of(causal, other_ids, tags, pixels(causal, BLUE, GREEN))
    assert (other_c[:, IMAGE2] - base_c[:, IMAGE2]).abs().amax(-1).min() > 1e-4


def layer_outputs(model: VisualChatModel, ids, tags, pixel_values) -> list[torch.Tensor]:
    """The hidden states after every decoder layer, (1, seq, hidden) each."""
    captured: list[torch.Tensor] = []
    layers = model.language_model.model.layers
    hooks = [
        layer.register_forward_hook(
            lambda _m, _a, out: captured.append((out[0] if isinstance(out, tuple) else out).clone())
        )
        for layer in layers
    ]
    try:
        logits_of(model, ids, tags, pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == len(layers) == 2
    return captured


def test_hidden_states_of_image_1_ignore_image_2(mmca_model: VisualChatModel) -> None:
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    base = layer_outputs(mmca_model, ids, tags, pixels(mmca_model, RED, GREEN))
    other = layer_outputs(mmca_model, ids, tags, pixels(mmca_model, RED, BLUE))
    for layer, (h_base, h_other) in enumerate(zip(base, other, strict=True)):
        assert h_base.shape == (1, 44, 32)
        torch.testing.assert_close(h_other[:, IMAGE1], h_base[:, IMAGE1], atol=1e-6, rtol=0)
        assert (h_other[:, IMAGE2] - h_base[:, IMAGE2]).abs().max() > 1e-4, layer


def test_image_features_equal_pixel_values(mmca_model: VisualChatModel) -> None:
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    pv = pixels(mmca_model, RED, GREEN)
    with torch.no_grad():
        features = mmca_model.encode_images(pv)
    assert features.shape == (2, NUM_IMAGE_TOKENS, 32)
    from_pixels = logits_of(mmca_model, ids, tags, pv)
    with torch.no_grad():
        from_features = mmca_model(ids, tags, image_features=features).logits
        from_flat = mmca_model(ids, tags, image_features=features.reshape(-1, 32)).logits
    assert torch.equal(from_features, from_pixels)
    assert torch.equal(from_flat, from_pixels)


def test_embed_splices_features_in_row_major_order(mmca_model: VisualChatModel) -> None:
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    features = torch.arange(2 * NUM_IMAGE_TOKENS * 32, dtype=torch.float32).reshape(2, 16, 32)
    with torch.no_grad():
        embeds = mmca_model.embed(ids, tags, features)
        text = mmca_model.language_model.get_input_embeddings()(ids)
    assert embeds.shape == (1, 44, 32)
    assert torch.equal(embeds[0, IMAGE1], features[0])
    assert torch.equal(embeds[0, IMAGE2], features[1])
    assert torch.equal(embeds[0, :4], text[0, :4])
    assert torch.equal(embeds[0, AFTER_IMAGE2], text[0, AFTER_IMAGE2])


# --- incremental decoding ---------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["mmca", "causal"])
def test_incremental_decoding_with_dynamic_cache_equals_full_forward(attention: str) -> None:
    model, _ = make_model(attention)
    prompt_ids, prompt_tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    new_tokens = [77, 78, 79, 80]
    full_ids = torch.cat([prompt_ids, torch.tensor([new_tokens])], dim=1)
    full_tags = torch.cat([prompt_tags, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    pv = pixels(model, RED, GREEN)
    full = logits_of(model, full_ids, full_tags, pv)
    cache = DynamicCache(config=model.language_model.config)
    with torch.no_grad():
        out = model(prompt_ids, prompt_tags, pixel_values=pv, past_key_values=cache, use_cache=True)
        steps = [out.logits]
        tags = prompt_tags
        for token in new_tokens:
            tags = torch.cat([tags, torch.zeros(1, 1, dtype=torch.long)], dim=1)
            out = model(torch.tensor([[token]]), tags, past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert cache.get_seq_length() == 48
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_splitting_an_image_equals_full_forward(mmca_model) -> None:
    # The engine's SplitFuse chunks may end inside an image: the second half of image 2's
    # queries must still see the first half through the cache.
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    pv = pixels(mmca_model, RED, GREEN)
    full = logits_of(mmca_model, ids, tags, pv)
    with torch.no_grad():
        flat = mmca_model.encode_images(pv).reshape(-1, 32)  # (32, hidden)
        cache = DynamicCache(config=mmca_model.language_model.config)
        split = 30  # inside image 2 (23-38): 16 + 7 image vectors in chunk 1
        first = mmca_model(
            ids[:, :split],
            tags[:, :split],
            image_features=flat[:23],
            past_key_values=cache,
            use_cache=True,
        )
        second = mmca_model(
            ids[:, split:], tags, image_features=flat[23:], past_key_values=cache, use_cache=True
        )
    torch.testing.assert_close(
        torch.cat([first.logits, second.logits], dim=1), full, atol=1e-5, rtol=1e-5
    )


# --- checks -----------------------------------------------------------------------------------


def test_wrong_number_of_image_features_raises(mmca_model: VisualChatModel) -> None:
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    with pytest.raises(
        ValueError,
        match=r"^32 image positions in the input but 16 image feature vectors were given "
        r"\(16 per image\)$",
    ):
        mmca_model(ids, tags, pixel_values=pixels(mmca_model, RED))
    with pytest.raises(ValueError, match=r"^32 image positions in the input but 0 image feature"):
        mmca_model(ids, tags)
    text_ids, text_tags = layout(TEXT_A)
    with pytest.raises(ValueError, match=r"^0 image positions in the input but 16 image feature"):
        mmca_model(text_ids, text_tags, pixel_values=pixels(mmca_model, RED))


def test_token_modality_must_cover_the_input(mmca_model: VisualChatModel) -> None:
    ids, tags = layout(TEXT_A)
    with pytest.raises(ValueError, match=r"token_modality \(1, 3\) must cover the input \(1, 4\)"):
        mmca_model(ids, tags[:, :3])
    with pytest.raises(ValueError, match=r"token_modality \(2, 4\) must cover the input \(1, 4\)"):
        mmca_model(ids, tags.expand(2, -1))


# --- batching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["mmca", "causal"])
def test_right_padded_batch_equals_single_sequences(attention: str) -> None:
    model, tokenizer = make_model(attention)
    pad = tokenizer.pad_token_id
    ids_a, tags_a = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)  # 44 tokens, 2 images
    ids_b, tags_b = layout(TEXT_B, IMAGE, TEXT_A)  # 23 tokens, 1 image
    pv_a, pv_b = pixels(model, RED, GREEN), pixels(model, BLUE)
    single_a = logits_of(model, ids_a, tags_a, pv_a)
    single_b = logits_of(model, ids_b, tags_b, pv_b)
    num_pad = 44 - 23
    ids = torch.cat([ids_a, torch.cat([ids_b, torch.full((1, num_pad), pad)], dim=1)])
    tags = torch.cat([tags_a, torch.cat([tags_b, torch.full((1, num_pad), -1)], dim=1)])
    mask = torch.ones(2, 44, dtype=torch.long)
    mask[1, 23:] = 0
    batched = logits_of(model, ids, tags, torch.cat([pv_a, pv_b]), attention_mask=mask)
    assert batched.shape == (2, 44, len(tokenizer))
    assert not batched.isnan().any()
    torch.testing.assert_close(batched[:1], single_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1:, :23], single_b, atol=1e-5, rtol=1e-5)


# --- sliding-window backbones -------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["mmca", "causal"])
@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_incremental_decoding_past_a_sliding_window(arch: str, attention: str) -> None:
    # Mistral-7B-v0.1 (4096) and Phi-3-mini (2047) configs carry a sliding window; DynamicCache
    # then keeps only the last window of keys, while token_modality keeps every position.
    tokenizer = make_tokenizer()
    config = make_backbone_config(tokenizer, arch)
    config.sliding_window = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model = build_model(make_config(attention), backbone, seed=0)
    ids = torch.tensor([[5, 17, 42, 99, 120, 33, 250, 64, 11, 5, 200, 7, 8, 9, 60, 61, 62, 63]])
    tags = torch.zeros_like(ids)
    full = logits_of(model, ids, tags)
    cache = DynamicCache(config=model.language_model.config)
    with torch.no_grad():
        steps = [model(ids[:, :10], tags[:, :10], past_key_values=cache, use_cache=True).logits]
        for i in range(10, ids.shape[1]):
            step = model(ids[:, i : i + 1], tags[:, : i + 1], past_key_values=cache, use_cache=True)
            steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# --- training forward -------------------------------------------------------------------------


def test_loss_is_cross_entropy_over_the_labelled_positions(mmca_model: VisualChatModel) -> None:
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    labels = torch.full_like(ids, -100)
    labels[0, 40:44] = ids[0, 40:44]  # train the last four text tokens only
    pv = pixels(mmca_model, RED, GREEN)
    with torch.no_grad():
        out = mmca_model(ids, tags, pixel_values=pv, labels=labels)
    # Causal LM loss: logits at position t predict the label at t + 1.
    expected = torch.nn.functional.cross_entropy(out.logits[0, 39:43], ids[0, 40:44])
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-5)


def test_embed_adds_each_image_its_number_vector() -> None:
    model, _ = make_model(image_indices=2)
    ids, tags = layout(TEXT_A, IMAGE, TEXT_B, IMAGE, TEXT_C)
    features = torch.randn(1, NUM_IMAGE_TOKENS, 32).expand(2, -1, -1)  # the same image twice
    with torch.no_grad():
        embeds = model.embed(ids, tags, features)
    vectors = model.projector.image_index.detach()
    torch.testing.assert_close(embeds[0, IMAGE1], features[0] + vectors[0])
    torch.testing.assert_close(embeds[0, IMAGE2], features[1] + vectors[1])
    assert (embeds[0, IMAGE1] - embeds[0, IMAGE2]).abs().max() > 0.1
