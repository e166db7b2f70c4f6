"""The engine's linear kernels: same results as `linear` by every kernel, the fastest kernel per
pass size chosen from timings, weights given back as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_testing import GREEDY, WORKLOAD, make_engine, reference
from safetensors.torch import save_file
from torch import nn

from serving.engine import EngineConfig, linear_kernels
from serving.engine.linear_kernels import (
    KERNELS,
    TIMED_ROWS,
    EngineLinears,
    KernelChoice,
    _Product,
    choose_kernels,
)
from visualchat.api import VisualChat


class TiedModel(nn.Module):
    """Embeddings tied to the output layer, as in SmolLM2, plus layers that must stay as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.proj = nn.Linear(8, 6, bias=True)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight
        self.odd = nn.Linear(8, 5)  # 5 output rows: no even row blocks ("rows" uses linear)
        self.low = nn.Linear(8, 6).to(torch.bfloat16)


def _linear_outputs(model: TiedModel, x: torch.Tensor) -> list[torch.Tensor]:
    return [model.proj(x), model.head(x), model.odd(x)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [(1, 8), (3, 8), (2, 64, 8), (0, 8)])
@pytest.mark.parametrize("parts", [2, 3])
def test_every_kernel_computes_what_linear_computes(
    kernel: str, rows: tuple[int, ...], parts: int
) -> None:
    torch.manual_seed(0)
    model = TiedModel()
    x = torch.randn(*rows)
    expected = _linear_outputs(model, x)
    linears = EngineLinears(model, parts, kernels=kernel)
    assert {id(layer) for layer in linears.layers} == {
        id(m) for m in (model.proj, model.head, model.odd)
    }
    for got, want in zip(_linear_outputs(model, x), expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    product = model.proj.engine_product
    if kernel == "rows":  # the blocks are views of the weight itself, nothing copied
        assert product.row_parts.shape == (parts, 6 // parts, 8)
        assert product.row_parts.data_ptr() == model.proj.weight.data_ptr()
    assert model.odd.engine_product.row_parts is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_chosen_kernel_is_the_one_that_runs(kernel: str, monkeypatch) -> None:
    model = TiedModel()
    EngineLinears(model, 2, kernels=kernel)
    used = []
    multiply = _Product.multiply
    monkeypatch.setattr(
        _Product, "multiply", lambda self, rows, k: used.append(k) or multiply(self, rows, k)
    )
    model.proj(torch.randn(4, 8))
    assert used == [kernel]


def test_layers_of_other_types_are_left_alone() -> None:
    model = TiedModel()
    EngineLinears(model, 2, kernels="linear")
    assert "forward" not in vars(model.low) and not hasattr(model.low, "engine_product")
    assert model.low.weight.is_contiguous()


def test_weights_keep_their_storage_and_tied_embeddings_still_look_up_their_rows() -> None:
    torch.manual_seed(0)
    model = TiedModel()
    ids = torch.tensor([[0, 5, 11]])
    expected = model.embed(ids)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    EngineLinears(model, 2, kernels="rows")
    assert model.head.weight is model.embed.weight
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert all(p.is_contiguous() for p in model.parameters())
    torch.testing.assert_close(model.embed(ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_release_gives_back_the_forward_and_leaves_the_weights_as_they_were(kernel: str) -> None:
    torch.manual_seed(0)
    model = TiedModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    linears = EngineLinears(model, 2, kernels=kernel)
    linears.release()
    assert list(model.parameters()) == parameters  # the same Parameter objects
    for name, value in model.state_dict().items():
        assert value.is_contiguous(), name
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    for layer in (model.proj, model.head, model.odd):
        assert not {"forward", "engine_product", "engine_linears"} & set(vars(layer))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 part"):
        EngineLinears(TiedModel(), 0)
    with pytest.raises(ValueError, match="kernels must be"):
        EngineLinears(TiedModel(), 2, kernels="fast")
    with pytest.raises(ValueError, match="linear_kernels must be"):
        EngineConfig(linear_kernels="mkl_packed")  # tried and dropped: refused, not ignored
    with pytest.raises(ValueError, match="kernel choice"):
        KernelChoice({1: "fast"})
    with pytest.raises(ValueError, match="kernel choice"):
        KernelChoice({})


def test_each_pass_size_uses_the_kernel_fastest_at_the_nearest_timed_size() -> None:
    choice = KernelChoice.fastest(
        {
            1: {"linear": 2.0, "rows": 1.0},
            8: {"linear": 3.0, "rows": 4.0},
            64: {"linear": 6.0, "rows": 4.0},
        }
    )
    assert choice.by_rows == {1: "rows", 8: "linear", 64: "rows"}
    # log scale: 2 is nearer 1 than 8; 3 nearer 8; 22 nearer 8 (log 22 - log 8 < log 64 - log 22)
    for _ in range(2):  # the second time from what the first looked up
        assert [choice.kernel_for(n) for n in (1, 2, 3, 8, 22, 23, 64, 4096)] == [
            "rows", "rows", "linear", "linear", "linear", "rows", "rows", "rows",
        ]  # fmt: skip
    assert choice.kernels == {"rows", "linear"}


def test_linear_stays_unless_rows_is_clearly_faster() -> None:
    timings = {1: {"linear": 1.0, "rows": 0.81}, 8: {"linear": 1.0, "rows": 0.79}}
    assert KernelChoice.fastest(timings).by_rows == {1: "linear", 8: "rows"}
    assert KernelChoice.fastest(timings, margin=0.0).by_rows == {1: "rows", 8: "rows"}


def test_choose_kernels_times_every_kernel_at_every_size_in_turns() -> None:
    model = TiedModel()
    linears = EngineLinears(model, 2, kernels="linear")
    calls = []

    def timer(products, kernel, rows):
        assert list(products) == linears.products  # every product, every pass
        calls.append((kernel, rows))
        return {"linear": 3.0, "rows": 2.0, "packed": 4.0, "blocks": 5.0}[kernel] * (
            rows if kernel == "rows" else 1
        )

    choice, seconds = choose_kernels(linears.products, sizes=(1, 16), rounds=2, timer=timer)
    # a warm-up round and 2 timed ones, the kernels taking turns within each round
    assert calls == [(k, r) for r in (1, 16) for _ in range(3) for k in KERNELS]
    assert choice.by_rows == {1: "rows", 16: "linear"}
    assert seconds[16] == {"linear": 3.0, "rows": 32.0, "packed": 4.0, "blocks": 5.0}


def test_auto_keeps_the_layers_when_asked_not_to_give_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    linear_wins = {rows: {"linear": 1.0, "rows": 9.0} for rows in TIMED_ROWS}
    monkeypatch.setattr(
        linear_kernels,
        "choose_kernels",
        lambda products, **_: (KernelChoice.fastest(linear_wins), linear_wins),
    )
    assert EngineLinears(TiedModel(), 2, kernels="auto").layers == []  # given back
    kept = EngineLinears(TiedModel(), 2, kernels="auto", give_back=False)
    assert kept.choice.kernels == {"linear"}
    assert kept.layers and all("forward" in vars(layer) for layer in kept.layers)


def test_timing_a_pass_reads_every_product() -> None:
    model = TiedModel()
    linears = EngineLinears(model, 2, kernels="auto")
    assert set(linears.seconds) == {1, 8, 64}
    assert all(s > 0 for by in linears.seconds.values() for s in by.values())
    assert linears.choice == KernelChoice.fastest(linears.seconds)


@pytest.mark.parametrize("kernels", ["auto", *KERNELS])
@pytest.mark.parametrize(("tied", "lean"), [(False, True), (True, True), (False, False)])
def test_the_engine_runs_its_kernels_on_cpu_and_hands_the_model_back_on_close(
    kernels: str, tied: bool, lean: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with make_engine(tie_word_embeddings=tied, linear_kernels=kernels, lean_forward=lean) as engine:
        model = engine.model
        linears = engine.runner.linears
        assert linears is not None
        assert (engine.runner.lean is not None) == lean
        if kernels != "auto":
            assert linears.choice.kernels == {kernels}
        # Installed, unless auto found linear fastest everywhere and gave the layers back; the
        # lean forward multiplies through the stacked products itself, so it keeps them.
        gave_back = kernels == "auto" and linears.choice.kernels == {"linear"} and not lean
        assert bool(linears.layers) == (not gave_back)
        ours = engine.generate(WORKLOAD[:3], GREEDY)
    for conversation, out in zip(WORKLOAD[:3], ours, strict=True):
        expected = reference(tie_word_embeddings=tied).generate(conversation, GREEDY).token_ids
        assert out.token_ids == expected
    assert all(p.is_contiguous() for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())
    again = VisualChat(model, engine.tokenizer).generate(WORKLOAD[1], GREEDY).token_ids
    assert again == ours[1].token_ids


def test_the_engine_kernels_can_be_turned_off() -> None:
    engine = make_engine(linear_kernels=None)
    assert engine.runner.linears is None
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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [False, True])
def test_stacked_siblings_compute_what_each_layer_computes(bias: bool, kernel: str) -> None:
    torch.manual_seed(0)
    block = Block(bias)
    x = torch.randn(1, 5, 8)
    expected = _sibling_outputs(block, x)
    linears = EngineLinears(block, 2, kernels=kernel)
    assert linears.num_stacked == 2 and len(linears.layers) == 5 and len(linears.products) == 2
    assert block.q_proj.engine_product is block.v_proj.engine_product
    # One storage: q, k and v are consecutive row ranges of it (q is 8 rows of 8 floats).
    assert block.k_proj.weight.data_ptr() == block.q_proj.weight.data_ptr() + 8 * 8 * 4
    assert block.k_proj.weight.is_contiguous()
    for got, want in zip(_sibling_outputs(block, x), expected, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want)
    assert block.q_proj.engine_product.input is None  # nothing held once all took theirs


def test_stacked_siblings_recompute_for_another_input_or_order() -> None:
    torch.manual_seed(0)
    block = Block(bias=True)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    want_qx, want_kx, want_ky, want_vy = (
        block.q_proj(x),
        block.k_proj(x),
        block.k_proj(y),
        block.v_proj(y),
    )
    EngineLinears(block, 2, kernels="rows")
    torch.testing.assert_close(block.q_proj(x), want_qx)
    torch.testing.assert_close(block.k_proj(y), want_ky)  # another input: not x's k
    torch.testing.assert_close(block.k_proj(y), want_ky)  # asked twice
    torch.testing.assert_close(block.v_proj(y), want_vy)
    torch.testing.assert_close(block.k_proj(x), want_kx)


def test_release_unstacks_siblings_into_their_own_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    block = Block(bias=False)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    EngineLinears(block, 2, kernels="rows").release()
    storages = set()
    for name, value in block.state_dict().items():
        assert value.is_contiguous(), name
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
        storages.add(value.untyped_storage().data_ptr())
    assert len(storages) == len(before)  # no weight shares a storage any more
    save_file(block.state_dict(), tmp_path / "block.safetensors")  # refuses shared storages
    assert not any("engine_product" in vars(m) or "forward" in vars(m) for m in block.modules())


@pytest.mark.parametrize("winner", KERNELS)
def test_auto_gives_the_layers_back_when_linear_wins_everywhere(winner: str, monkeypatch) -> None:
    def rigged(products, sizes=(1, 8), **_):
        seconds = {r: {k: 1.0 if k == winner else 2.0 for k in KERNELS} for r in sizes}
        return KernelChoice.fastest(seconds), seconds

    monkeypatch.setattr(linear_kernels, "choose_kernels", rigged)
    block = Block(bias=False)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    linears = EngineLinears(block, 2, kernels="auto")
    assert linears.choice.kernels == {winner}  # what it found is kept for the record
    installed = [m for m in block.modules() if "forward" in vars(m)]
    if winner == "linear":
        assert not installed and not linears.products
        storages = {v.untyped_storage().data_ptr() for v in block.state_dict().values()}
        assert len(storages) == len(before)  # unstacked again
    else:
        assert len(installed) == 5
    for name, value in block.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def rigged_choice(winner_at_8: str):
    """choose_kernels stand-in: linear wins at 1 row, `winner_at_8` at 8 rows and more."""

    def choose(products, kernels=KERNELS, **_):
        seconds = {
            1: {k: 1.0 if k == "linear" else 2.0 for k in kernels},
            8: {k: 1.0 if k == winner_at_8 else 2.0 for k in kernels},
        }
        return KernelChoice.fastest(seconds), seconds

    return choose


@pytest.mark.parametrize("winner", ["packed", "rows"])
def test_packed_copies_are_kept_only_when_packed_is_chosen(winner: str, monkeypatch) -> None:
    monkeypatch.setattr(linear_kernels, "choose_kernels", rigged_choice(winner))
    model = TiedModel()
    linears = EngineLinears(model, 2, kernels="auto")
    assert linears.choice.by_rows == {1: "linear", 8: winner}
    weight_bytes = sum(p.weight.numel() * 4 for p in linears.products)
    if winner == "packed":
        assert all(p.packed is not None for p in linears.products)
        assert linears.packed_bytes == weight_bytes  # the price: a copy of every weight
    else:
        assert linears.packed_bytes == 0 and all(p.packed is None for p in linears.products)
    x = torch.randn(8, 8)
    torch.testing.assert_close(model.proj(x), x @ model.proj.weight.T + model.proj.bias)
    products = linears.products
    linears.release()
    assert all(p.packed is None for p in products)


def test_without_onednn_packed_is_never_timed_and_refused_when_asked(monkeypatch) -> None:
    monkeypatch.setattr(linear_kernels, "packing_available", lambda: False)
    timed = []

    def timer(products, kernel, rows):
        timed.append(kernel)
        return 1.0

    monkeypatch.setattr(
        linear_kernels,
        "choose_kernels",
        lambda products, kernels=KERNELS, **_: choose_kernels(
            products, sizes=(1,), rounds=1, timer=timer, kernels=kernels
        ),
    )
    linears = EngineLinears(TiedModel(), 2, kernels="auto")
    assert "packed" not in timed and set(timed) == {"linear", "rows"}
    assert linears.packed_bytes == 0
    with pytest.raises(ValueError, match="oneDNN"):
        EngineLinears(TiedModel(), 2, kernels="packed")


def test_onednn_packing_is_available_on_this_build() -> None:
    """The pinned torch has it; if a build ever lacks it, the engine falls back (test above)."""
    assert linear_kernels.packing_available()


def test_the_packed_kernel_reads_the_packed_copy() -> None:
    model = TiedModel()
    EngineLinears(model, 2, kernels="packed")
    product = model.proj.engine_product
    x = torch.randn(4, 8)
    doubled = 2 * product.weight
    product.packed = torch.ops.mkldnn._reorder_linear_weight(doubled, None)
    with torch.no_grad():
        torch.testing.assert_close(model.proj(x), x @ doubled.T + model.proj.bias)
