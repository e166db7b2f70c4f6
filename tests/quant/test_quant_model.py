"""quantize_model on tiny VisualChat models; quantized checkpoints through every loader."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from factories import BLUE, GREEN, RED, make_conversation, make_image, make_model
from safetensors import safe_open
from torch import nn

from serving.engine import Engine, EngineConfig
from visualchat.api import VisualChat
from visualchat.model.loading import CONFIG_NAME, WEIGHTS_NAME, LoadOptions, load_pretrained
from visualchat.model.modeling import VisualChatModel
from visualchat.quant import QuantLinear, quant_config, quantize_model
from visualchat.quant.model import module_bytes
from visualchat.sampling import SamplingParams

BACKBONE_LINEARS = [
    f"language_model.model.layers.{i}.{name}"
    for i in range(2)
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def linears(model: nn.Module, kind: type[nn.Module]) -> list[str]:
    return sorted(name for name, m in model.named_modules() if type(m) is kind)


@torch.no_grad()
def logits_with_images(model: VisualChatModel) -> torch.Tensor:
    n = model.num_image_tokens
    ids = [5, 17, 42] + [0] * n + [7, 8, 9] + [0] * n + [120, 33]
    tags = [0, 0, 0] + [1] * n + [0, 0, 0] + [2] * n + [0, 0]
    transform = model.vision.image_transform()
    pixels = torch.stack([transform(make_image(RED)), transform(make_image(GREEN))])
    return model(torch.tensor([ids]), torch.tensor([tags]), pixel_values=pixels).logits


def test_quantize_model_replaces_only_the_backbone_linears() -> None:
    model, _ = make_model()
    vision_and_projector = [
        n for n in linears(model, nn.Linear) if n.startswith(("vision", "proj"))
    ]
    assert vision_and_projector  # the test has teeth: there are linears to leave alone
    report = quantize_model(model, "fp6_e3m2")
    assert linears(model, QuantLinear) == sorted(BACKBONE_LINEARS)
    assert [layer.name for layer in report.layers] == BACKBONE_LINEARS
    remaining = linears(model, nn.Linear)
    assert remaining == sorted([*vision_and_projector, "language_model.lm_head"])
    assert all(layer.sqnr_db > 15 for layer in report.layers)
    # 6 bits per weight plus one float32 scale per output channel.
    assert report.num_bytes == sum(
        o * i * 6 // 8 + 4 * o for o, i in (r.shape for r in report.layers)
    )
    assert report.num_bytes_bf16 == sum(2 * o * i for o, i in (r.shape for r in report.layers))


def test_quantize_model_with_no_skip_takes_vision_and_projector_but_not_a_tied_head() -> None:
    model, _ = make_model(tie_word_embeddings=True)
    quantize_model(model, "int8", skip=())
    quantized = linears(model, QuantLinear)
    assert any(n.startswith("vision.") for n in quantized)
    assert any(n.startswith("projector.") for n in quantized)
    assert "language_model.lm_head" not in quantized  # tied to the embeddings
    # nn.MultiheadAttention reads out_proj.weight directly: its out_proj stays a Linear subclass.
    for module in model.vision.modules():
        if isinstance(module, nn.MultiheadAttention):
            assert not isinstance(module.out_proj, QuantLinear)


def test_quantize_model_validates() -> None:
    model, _ = make_model()
    with pytest.raises(ValueError, match="unknown quantization format"):
        quantize_model(model, "fp3")
    quantize_model(model, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4")


def test_quantized_models_use_less_memory_and_err_in_the_order_of_their_bits() -> None:
    model, _ = make_model()
    reference = logits_with_images(model)
    before = module_bytes(model)
    errors = {}
    for fmt, rank in [("int8", 0), ("fp6_e3m2", 0), ("fp6_e3m2", 2), ("fp4_e2m1", 0)]:
        quantized = copy.deepcopy(model)
        quantize_model(quantized, fmt, lorc_rank=rank)
        assert module_bytes(quantized) < before
        logits = logits_with_images(quantized)
        errors[fmt, rank] = float((logits - reference).norm() / reference.norm())
    # (The tiny random model amplifies weight errors: its init is wide on purpose.)
    assert 0 < errors["int8", 0] < 0.05
    assert errors["int8", 0] < errors["fp6_e3m2", 2] < errors["fp6_e3m2", 0] < errors["fp4_e2m1", 0]
    assert errors["fp6_e3m2", 0] < 0.3


@pytest.mark.parametrize(("fmt", "rank"), [("fp6_e3m2", 4), ("int4", 0), ("fp5_e2m2", 0)])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path: Path, fmt: str, rank: int) -> None:
    model, tokenizer = make_model()
    quantize_model(model, fmt, lorc_rank=rank)
    folder = tmp_path / "quantized"
    VisualChat(model, tokenizer).save_pretrained(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())["quantization"]
    assert config == {"version": 1, "format": fmt, "lorc_rank": rank, "modules": BACKBONE_LINEARS}
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        q_proj = "language_model.model.layers.0.self_attn.q_proj"
        assert f"{q_proj}.weight" not in keys
        assert f.get_tensor(f"{q_proj}.codes_low").dtype == torch.uint8
        assert (f"{q_proj}.codes_high" in keys) == fmt.startswith(("fp6", "fp5"))
        assert (f"{q_proj}.lorc_u" in keys) == bool(rank)
    loaded, _ = load_pretrained(folder, LoadOptions(device="cpu"))
    assert linears(loaded, QuantLinear) == sorted(BACKBONE_LINEARS)
    assert torch.equal(logits_with_images(loaded), logits_with_images(model))
    # A bfloat16 load keeps the scales in float32.
    half, _ = load_pretrained(folder, LoadOptions(device="cpu", dtype="bfloat16"))
    layer = half.get_submodule(q_proj)
    assert half.dtype == torch.bfloat16 and layer.scales.dtype == torch.float32
    assert torch.equal(layer.scales, model.get_submodule(q_proj).scales)


def test_unquantized_checkpoints_carry_no_quantization_entry(tmp_path: Path) -> None:
    model, tokenizer = make_model()
    assert quant_config(model) is None
    VisualChat(model, tokenizer).save_pretrained(tmp_path / "plain")
    assert "quantization" not in json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())


WORKLOAD = [
    make_conversation("hello world"),
    make_conversation([make_image(RED), make_image(BLUE), "Compare the two images."]),
    make_conversation(
        [make_image(GREEN), "what is in the picture?"],
        "The first image is green.",
        ["and now?", make_image(RED)],
    ),
]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def quantized_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = make_model(seed=3)
    quantize_model(model, "fp6_e3m2", lorc_rank=2)
    folder = tmp_path_factory.mktemp("quant") / "fp6"
    VisualChat(model, tokenizer).save_pretrained(folder)
    return folder


def test_engine_on_a_quantized_checkpoint_equals_the_reference_decoder(
    quantized_checkpoint: Path,
) -> None:
    reference = VisualChat.from_pretrained(quantized_checkpoint, device="cpu")
    assert linears(reference.model, QuantLinear) == sorted(BACKBONE_LINEARS)
    expected = [reference.generate(c, GREEDY).token_ids for c in WORKLOAD]
    assert all(len(set(ids)) >= 3 for ids in expected)  # varied replies: equality says something
    engine = Engine.from_pretrained(
        quantized_checkpoint,
        EngineConfig(max_num_batched_tokens=13, block_size=4, num_blocks=128),
        device="cpu",
    )
    assert linears(engine.model, QuantLinear) == sorted(BACKBONE_LINEARS)
    assert engine.runner.lean is not None  # its own forward, calling the quantized layers
    results = engine.generate(WORKLOAD, GREEDY)
    assert [r.token_ids for r in results] == expected


def test_session_api_on_a_quantized_checkpoint(quantized_checkpoint: Path) -> None:
    vc = VisualChat.from_pretrained(quantized_checkpoint, device="cpu")
    session = vc.chat(params=SamplingParams(max_tokens=6))
    first = session.send("Compare the two images.", images=[make_image(RED), make_image(BLUE)])
    second = session.send("and now?")
    assert isinstance(first, str) and isinstance(second, str)
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]
