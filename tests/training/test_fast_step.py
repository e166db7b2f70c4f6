"""training.fast_step: frozen weights held in bf16 change nothing under bf16 autocast, the
float32 originals come back for evaluation, and compiled decoder layers compute what eager
ones do."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from training.fast_step import (
    FrozenBf16,
    compile_decoder_layers,
    decoder_layers,
    eager,
    uncompile_decoder_layers,
)


def _tiny_lm(seed: int = 0):
    """A tied-embedding Llama with a LoRA adapter: the embedded default's structure, tiny."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    )
    for name, param in model.named_parameters():  # LoRA B starts at zero: make it count
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_frozen_bf16_leaves_loss_and_gradients_unchanged() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, ids)
    frozen = FrozenBf16(model)
    embedding = model.get_input_embeddings().weight
    # Every frozen projection (q k v o gate up down per layer), not the tied embedding/head.
    assert len(frozen.params) == 2 * 7
    assert all(p is not embedding for p in frozen.params)
    originals = {id(p): p.data.clone() for p in frozen.params}

    frozen.apply()
    assert {p.dtype for p in frozen.params} == {torch.bfloat16}
    assert embedding.dtype == torch.float32  # a bf16 table would change the residual stream
    bf16_loss, bf16_grads = _loss_and_grads(model, ids)
    # Autocast rounds the float32 weights to bf16 for each matmul; holding them rounded is the
    # same arithmetic, so the results are equal, not merely close.
    assert torch.equal(bf16_loss, loss)
    assert grads.keys() == bf16_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(bf16_grads[name], grad), name

    frozen.restore()
    assert all(torch.equal(p.data, originals[id(p)]) for p in frozen.params)
    assert {p.dtype for p in frozen.params} == {torch.float32}


def test_full_precision_gives_the_float32_weights_inside_and_bf16_after() -> None:
    model = _tiny_lm()
    frozen = FrozenBf16(model)
    with frozen.full_precision():  # not applied: nothing to restore, nothing applied after
        assert {p.dtype for p in frozen.params} == {torch.float32}
    assert frozen.originals is None
    frozen.apply()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with frozen.full_precision(), torch.no_grad():
        assert {p.dtype for p in frozen.params} == {torch.float32}
        model(input_ids=ids)  # a float32 forward outside autocast works
    assert {p.dtype for p in frozen.params} == {torch.bfloat16}
    frozen.restore()


def test_trainable_weights_are_left_alone() -> None:
    model = _tiny_lm()
    frozen = FrozenBf16(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad is False for p in frozen.params)
    frozen.apply()
    assert {p.dtype for p in trainable} == {torch.float32}
    frozen.restore()


def test_compiled_layers_compute_what_eager_layers_do() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert compile_decoder_layers(model) == 2
    layers = decoder_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    for length in (20, 13):  # dynamic shapes: another length reuses the compiled layers
        with torch.no_grad():
            out = model(input_ids=ids[:, :length]).logits
        torch.testing.assert_close(out, expected[:, :length], atol=1e-5, rtol=1e-5)
    with eager(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    uncompile_decoder_layers(model)
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_decoder_layers_must_exist() -> None:
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
