"""Delta checkpoints: vision + projector + LoRA adapter over a named base backbone."""

from __future__ import annotations

import torch
from factories import make_backbone, make_model, make_tokenizer
from peft import LoraConfig, get_peft_model

from visualchat.model import delta, loading


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    modality = torch.tensor([[0, 0] + [1] * 16 + [0, 0, 0]])
    ids = torch.randint(3, 100, modality.shape)
    return ids, modality, torch.randn(1, 3, 32, 32)


def test_delta_with_lora_round_trips_logits(tmp_path) -> None:
    tokenizer = make_tokenizer()
    base = make_backbone(tokenizer, seed=3)
    base_dir = tmp_path / "base"
    loading.save_backbone(base, tokenizer, base_dir)

    model, _ = make_model(seed=5)
    model.language_model.load_state_dict(base.state_dict())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model.language_model = get_peft_model(model.language_model, lora)
    for name, param in model.language_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter matter
            torch.nn.init.normal_(param, std=0.5)
    ids, modality, pixels = _inputs()
    with torch.no_grad():
        expected = model(ids, modality, pixel_values=pixels).logits

    delta.save_delta(model, tmp_path / "delta", base_backbone=str(base_dir))
    assert sorted(p.name for p in (tmp_path / "delta").iterdir()) == [
        "adapter",
        "model.safetensors",
        "visualchat_config.json",
    ]
    assert delta.is_delta(tmp_path / "delta")
    loaded, loaded_tokenizer = loading.load_pretrained(tmp_path / "delta")
    assert not hasattr(loaded.language_model, "peft_config")  # merged for inference
    with torch.no_grad():
        actual = loaded(ids, modality, pixel_values=pixels).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert loaded_tokenizer.eos_token == tokenizer.eos_token
    # Each merged layer keeps its factors (for the engine's block kernels): the base plus their
    # delta, computed again, is the merged weight to the bit.
    merged = {
        name: module.merged_lora
        for name, module in loaded.language_model.named_modules()
        if hasattr(module, "merged_lora")
    }
    assert sorted(merged) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    for name, lora in merged.items():
        assert lora.scale == 2.0 and lora.a.shape[0] == 4
        rebuilt = base.get_submodule(name).weight + lora.delta()
        assert torch.equal(rebuilt, loaded.language_model.get_submodule(name).weight)
        assert not torch.equal(lora.delta(), torch.zeros_like(rebuilt))


def test_delta_without_adapter_stores_only_vision_and_projector(tmp_path) -> None:
    tokenizer = make_tokenizer()
    base = make_backbone(tokenizer, seed=3)
    loading.save_backbone(base, tokenizer, tmp_path / "base")
    model, _ = make_model(seed=5)
    model.language_model.load_state_dict(base.state_dict())
    delta.save_delta(model, tmp_path / "delta", base_backbone=str(tmp_path / "base"))
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "delta" / "model.safetensors")).keys()
    assert names and all(n.startswith(("vision.", "projector.")) for n in names)
    loaded, _ = loading.load_pretrained(tmp_path / "delta")
    ids, modality, pixels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, modality, pixel_values=pixels).logits,
            model(ids, modality, pixel_values=pixels).logits,
        )


def test_a_delta_keeps_the_default_system_prompt_it_was_trained_with(tmp_path) -> None:
    from visualchat.processor import VisualChatProcessor

    tokenizer = make_tokenizer()
    base = make_backbone(tokenizer, seed=3)
    loading.save_backbone(base, tokenizer, tmp_path / "base")
    model, _ = make_model(seed=5)
    model.config.default_system = ""
    delta.save_delta(model, tmp_path / "delta", base_backbone=str(tmp_path / "base"))
    loaded, loaded_tokenizer = loading.load_pretrained(tmp_path / "delta")
    assert loaded.config.default_system == ""
    processor = VisualChatProcessor.for_model(loaded, loaded_tokenizer)
    assert processor.template.default_system == ""
