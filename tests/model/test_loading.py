"""Checkpoints (save_pretrained / load_pretrained), backbones from HF folders, LoadOptions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import GREEN, RED, make_backbone, make_image, make_model, make_tokenizer

from visualchat.model.loading import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoadOptions,
    build_model,
    is_checkpoint,
    load_backbone,
    load_pretrained,
    save_pretrained,
)
from visualchat.model.modeling import VisualChatModel


@torch.no_grad()
def logits_with_images(model: VisualChatModel) -> torch.Tensor:
    """text (3) | image 1 | text (2) | image 2 | text (3), n = model.num_image_tokens each."""
    n = model.num_image_tokens
    ids = [5, 17, 42] + [0] * n + [7, 8] + [0] * n + [120, 33, 250]
    tags = [0, 0, 0] + [1] * n + [0, 0] + [2] * n + [0, 0, 0]
    transform = model.vision.image_transform()
    pixels = torch.stack([transform(make_image(RED)), transform(make_image(GREEN))])
    return model(torch.tensor([ids]), torch.tensor([tags]), pixel_values=pixels).logits


@pytest.mark.parametrize(
    ("tie", "image_indices"),
    [(False, 0), (True, 0), (False, 2)],
    ids=["untied", "tied", "numbered"],
)
@pytest.mark.parametrize("attention", ["mmca", "causal"])
def test_round_trip_gives_identical_logits(
    tmp_path: Path, attention: str, tie: bool, image_indices: int
) -> None:
    model, tokenizer = make_model(attention, tie_word_embeddings=tie, image_indices=image_indices)
    folder = tmp_path / "ckpt"
    save_pretrained(model, tokenizer, folder)
    assert is_checkpoint(folder)
    loaded, loaded_tokenizer = load_pretrained(folder, LoadOptions(device="cpu"))
    assert loaded.config.attention == attention
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.config.projector.image_indices == image_indices
    assert loaded.dtype == torch.float32
    assert not loaded.training
    lm = loaded.language_model
    assert lm.config.tie_word_embeddings is tie
    shares = lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    assert shares is tie
    expected = logits_with_images(model)
    assert torch.equal(logits_with_images(loaded), expected)
    assert (expected[0, 20] - expected[0, -1]).abs().max() > 1e-3  # not a constant model
    text = "<|im_start|>user\nhéllo 中文<|im_end|>"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.eos_token == "<|im_end|>"


def test_checkpoint_folder_layout(tmp_path: Path) -> None:
    model, tokenizer = make_model("mmca", projector="perceiver")
    folder = tmp_path / "ckpt"
    save_pretrained(model, tokenizer, folder)
    files = {p.name for p in folder.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json", "tokenizer_config.json"} <= files
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind
    payload = json.loads((folder / CONFIG_NAME).read_text())
    assert payload["visualchat"]["attention"] == "mmca"
    assert payload["visualchat"]["projector"]["type"] == "perceiver"
    assert payload["visualchat"]["vision"]["custom"]["patch_size"] == 8
    assert payload["backbone"]["model_type"] == "llama"
    loaded, _ = load_pretrained(folder)
    assert loaded.num_image_tokens == 4
    assert torch.equal(logits_with_images(loaded), logits_with_images(model))


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path: Path) -> None:
    first, tokenizer = make_model("mmca", seed=0)
    second, _ = make_model("causal", seed=1)
    folder = tmp_path / "ckpt"
    save_pretrained(first, tokenizer, folder)
    save_pretrained(second, tokenizer, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_pretrained(folder)
    assert loaded.config.attention == "causal"
    assert torch.equal(logits_with_images(loaded), logits_with_images(second))


def test_a_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    model, _ = make_model("mmca")

    class BrokenTokenizer:
        def save_pretrained(self, folder) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, BrokenTokenizer(), tmp_path / "ckpt")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_load_pretrained_of_a_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is not a VisualChat checkpoint \(no "):
        load_pretrained(tmp_path / "nowhere")
    assert not is_checkpoint(tmp_path)


def test_build_model_is_deterministic_with_a_seed() -> None:
    tokenizer = make_tokenizer()
    a = build_model(make_model()[0].config, make_backbone(tokenizer), seed=5)
    b = build_model(make_model()[0].config, make_backbone(tokenizer), seed=5)
    c = build_model(make_model()[0].config, make_backbone(tokenizer), seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.projector.net[0].weight, c.projector.net[0].weight)
    assert not a.training


# --- backbones from an HF folder ------------------------------------------------------------------


def save_hf_backbone(folder: Path, tie: bool = False):
    tokenizer = make_tokenizer()
    backbone = make_backbone(tokenizer, "llama", tie_word_embeddings=tie)
    backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return backbone, tokenizer


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_load_backbone_from_an_hf_folder(tmp_path: Path, tie: bool) -> None:
    original, tokenizer = save_hf_backbone(tmp_path, tie)
    backbone, loaded_tokenizer = load_backbone(tmp_path, LoadOptions(device="cpu"))
    assert type(backbone).__name__ == "LlamaForCausalLM"
    assert not backbone.training
    assert backbone.dtype == torch.float32
    ids = torch.tensor([[5, 17, 42, 99, 120]])
    with torch.no_grad():
        assert torch.equal(backbone(ids).logits, original(ids).logits)
    assert loaded_tokenizer("héllo 中文")["input_ids"] == tokenizer("héllo 中文")["input_ids"]
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id


def test_load_backbone_keeps_the_generation_config(tmp_path: Path) -> None:
    # Instruct models list extra end-of-turn ids in generation_config.json only; the reference
    # decoder stops on model.generation_config.eos_token_id.
    original, _ = save_hf_backbone(tmp_path)
    original.generation_config.eos_token_id = [2, 7]
    original.generation_config.save_pretrained(tmp_path)
    backbone, _ = load_backbone(tmp_path, LoadOptions(device="cpu"))
    assert backbone.generation_config.eos_token_id == [2, 7]


def test_load_backbone_in_bfloat16(tmp_path: Path) -> None:
    save_hf_backbone(tmp_path)
    backbone, _ = load_backbone(tmp_path, LoadOptions(device="cpu", dtype="bfloat16"))
    assert backbone.dtype == torch.bfloat16


def test_load_backbone_of_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"expected a local HF model folder or a \.gguf"):
        load_backbone(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.gguf")


@pytest.mark.parametrize("dtype", ["float33", "Tensor", "cuda"])
def test_load_options_reject_an_unknown_dtype(dtype: str) -> None:
    with pytest.raises(ValueError, match=rf"^unknown dtype '{dtype}' \(try float32, bfloat16"):
        LoadOptions(device="cpu", dtype=dtype).resolve()


def test_load_options_defaults_on_cpu() -> None:
    assert LoadOptions(device="cpu").resolve() == (torch.device("cpu"), torch.float32)
    assert LoadOptions(device="cpu", dtype="float16").resolve() == (
        torch.device("cpu"),
        torch.float16,
    )


def test_a_checkpoint_loads_in_another_dtype(tmp_path: Path) -> None:
    model, tokenizer = make_model("mmca")
    save_pretrained(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load_pretrained(tmp_path / "ckpt", LoadOptions(device="cpu", dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.vision.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(
        logits_with_images(loaded).float(), logits_with_images(model), atol=0.3, rtol=0.1
    )


def test_checkpoint_weights_that_do_not_match_the_config_are_refused(tmp_path: Path) -> None:
    model, tokenizer = make_model("mmca")
    folder = tmp_path / "ckpt"
    save_pretrained(model, tokenizer, folder)
    payload = json.loads((folder / CONFIG_NAME).read_text())
    payload["backbone"]["num_hidden_layers"] = 3
    (folder / CONFIG_NAME).write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"checkpoint does not match its config \(missing \["):
        load_pretrained(folder)
