"""Split linear layers: same results as `linear`, same parameters, weights given back as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_testing import GREEDY, WORKLOAD, make_engine, reference
from safetensors.torch import save_file
from torch import nn

from serving.engine.split_linear import SplitLinears
from visualchat.api import VisualChat


class TiedModel(nn.Module):
    """Embeddings tied to the output layer, as in SmolLM2, plus layers that must stay as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.proj = nn.Linear(8, 6, bias=True)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight
        self.odd = nn.Linear(8, 5)  # 5 output rows do not split into 2 blocks
        self.low = nn.Linear(8, 6).to(torch.bfloat16)


def _linear_outputs(model: TiedModel, x: torch.Tensor) -> list[torch.Tensor]:
    return [model.proj(x), model.head(x), model.odd(x)]


@pytest.mark.parametrize("rows", [(1, 8), (3, 8), (2, 64, 8)])
@pytest.mark.parametrize("parts", [2, 3])
def test_split_layers_compute_what_linear_computes(rows: tuple[int, ...], parts: int) -> None:
    torch.manual_seed(0)
    model = TiedModel()
    x = torch.randn(*rows)
    expected = _linear_outputs(model, x)
    split = SplitLinears(model, parts)
    assert {id(layer) for layer in split.layers} == {id(model.proj), id(model.head)}
    for got, want in zip(_linear_outputs(model, x), expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    # The split forward is what ran, not linear: its blocks are views of the weight itself.
    assert model.proj.split_weight.shape == (parts, 6 // parts, 8)
    assert model.proj.split_weight.data_ptr() == model.proj.weight.data_ptr()


def test_layers_that_do_not_split_are_left_alone() -> None:
    model = TiedModel()
    SplitLinears(model, 2)
    for layer in (model.odd, model.low):
        assert "forward" not in vars(layer) and not hasattr(layer, "split_weight")
        assert layer.weight.is_contiguous()


def test_weights_keep_their_storage_and_tied_embeddings_still_look_up_their_rows() -> None:
    torch.manual_seed(0)
    model = TiedModel()
    ids = torch.tensor([[0, 5, 11]])
    expected = model.embed(ids)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    SplitLinears(model, 2)
    assert model.head.weight is model.embed.weight
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert all(p.is_contiguous() for p in model.parameters())
    torch.testing.assert_close(model.embed(ids), expected, rtol=0, atol=0)


def test_release_gives_back_the_forward_and_leaves_the_weights_as_they_were() -> None:
    torch.manual_seed(0)
    model = TiedModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    split = SplitLinears(model, 2)
    split.release()
    assert list(model.parameters()) == parameters  # the same Parameter objects
    for name, value in model.state_dict().items():
        assert value.is_contiguous(), name
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    for layer in (model.proj, model.head):
        assert "forward" not in vars(layer) and not hasattr(layer, "split_weight")


def test_a_single_part_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 parts"):
        SplitLinears(TiedModel(), 1)


@pytest.mark.parametrize("tied", [False, True])
def test_the_engine_splits_on_cpu_and_hands_the_model_back_on_close(
    tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with make_engine(tie_word_embeddings=tied) as engine:
        model = engine.model
        assert engine.runner.split is not None and engine.runner.split.layers
        ours = engine.generate([WORKLOAD[1]], GREEDY)[0].token_ids
    assert ours == reference(tie_word_embeddings=tied).generate(WORKLOAD[1], GREEDY).token_ids
    assert all(p.is_contiguous() for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())
    again = VisualChat(model, engine.tokenizer).generate(WORKLOAD[1], GREEDY).token_ids
    assert again == ours


def test_the_split_can_be_turned_off() -> None:
    engine = make_engine(split_linear=False)
    assert engine.runner.split is None
    assert not any("forward" in vars(m) for m in engine.model.modules())


class Block(nn.Module):
    """A decoder block's sibling layers, as transformers' Llama (bias=False) and Qwen2 name them."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=bias)
        self.k_proj = nn.Linear(8, 4, bias=bias)
        self.v_proj = nn.Linear(8, 4, bias=bias)
        self.gate_proj = nn.Linear(8, 6, bias=False)
        self.up_proj = nn.Linear(8, 6, bias=False)


def _sibling_outputs(block: Block, x: torch.Tensor) -> list[torch.Tensor]:
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    return [getattr(block, name)(x) for name in names]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_siblings_compute_what_each_layer_computes(bias: bool) -> None:
    torch.manual_seed(0)
    block = Block(bias)
    x = torch.randn(1, 5, 8)
    expected = _sibling_outputs(block, x)
    split = SplitLinears(block, 2)
    assert split.num_fused == 2 and len(split.layers) == 5
    assert block.q_proj.fused_siblings is block.v_proj.fused_siblings
    # One storage: q, k and v are consecutive row ranges of it (q is 8 rows of 8 floats).
    assert block.k_proj.weight.data_ptr() == block.q_proj.weight.data_ptr() + 8 * 8 * 4
    assert block.k_proj.weight.is_contiguous()
    for got, want in zip(_sibling_outputs(block, x), expected, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want)
    assert block.q_proj.fused_siblings.input is None  # nothing held once all took theirs


def test_fused_siblings_recompute_for_another_input_or_order() -> None:
    torch.manual_seed(0)
    block = Block(bias=True)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    want_qx, want_kx, want_ky, want_vy = (
        block.q_proj(x),
        block.k_proj(x),
        block.k_proj(y),
        block.v_proj(y),
    )
    SplitLinears(block, 2)
    torch.testing.assert_close(block.q_proj(x), want_qx)
    torch.testing.assert_close(block.k_proj(y), want_ky)  # another input: not x's k
    torch.testing.assert_close(block.k_proj(y), want_ky)  # asked twice
    torch.testing.assert_close(block.v_proj(y), want_vy)
    torch.testing.assert_close(block.k_proj(x), want_kx)


def test_release_unfuses_siblings_into_their_own_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    block = Block(bias=False)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    SplitLinears(block, 2).release()
    storages = set()
    for name, value in block.state_dict().items():
        assert value.is_contiguous(), name
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
        storages.add(value.untyped_storage().data_ptr())
    assert len(storages) == len(before)  # no weight shares a storage any more
    save_file(block.state_dict(), tmp_path / "block.safetensors")  # refuses shared storages
    assert not any("fused_siblings" in vars(m) or "forward" in vars(m) for m in block.modules())
