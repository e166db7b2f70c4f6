"""Finding a float32 weight's exact block form, packing it, and multiplying through it."""

from __future__ import annotations

import pytest
import torch
from block_formats import make_gguf_like, q4_1_values, q8_0_values
from engine_testing import model_copy
from torch import nn

from serving.bench.run import weight_bytes_per_token
from serving.engine import Engine, EngineConfig, block_kernels, linear_kernels
from serving.engine.block_weights import BlockWeight, pack_q4_1, pack_q8_0
from serving.engine.linear_kernels import EngineLinears, KernelChoice
from visualchat.model.delta import MergedLora

pytestmark = pytest.mark.skipif(
    not block_kernels.available(), reason="the block kernels need a C++ compiler (g++)"
)


def _weight(out: int = 80, inp: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _float16_step(value: float) -> float:
    """The next float32 up: a value no float16-scaled block holds."""
    return torch.nextafter(torch.tensor(value), torch.tensor(float("inf"))).item()


@pytest.mark.parametrize(("make", "fmt"), [(q4_1_values, "q4_1"), (q8_0_values, "q8_0")])
def test_a_block_format_weight_is_found_and_its_product_rebuilds_it_to_the_bit(make, fmt) -> None:
    weight = make(_weight())
    found = BlockWeight.from_float(weight)
    assert found is not None and found.fmt == fmt
    assert (found.out_features, found.in_features) == (80, 96)
    # One-hot rows: each output is 1 * w + 0 * (the rest), so the kernel's rebuilt weights show.
    assert torch.equal(found.multiply(torch.eye(96)), weight.t())
    x = torch.randn(7, 96)
    torch.testing.assert_close(found.multiply(x), x @ weight.t())


def test_q4_1_is_preferred_where_both_formats_hold() -> None:
    weight = torch.zeros(16, 32)
    weight[:, ::2] = 15 * 127 / 2**12  # Q4_1 with d = 127 / 2^12, Q8_0 with d = 15 / 2^12
    assert BlockWeight.from_float(weight).fmt == "q4_1"
    assert BlockWeight.from_float(q8_0_values(_weight())).fmt == "q8_0"


def test_constant_and_zero_blocks_are_exact() -> None:
    weight = q4_1_values(_weight())
    weight[3, :32] = 0.0
    weight[5, 32:64] = -0.5
    found = BlockWeight.from_float(weight)
    assert found is not None
    assert torch.equal(found.multiply(torch.eye(96)), weight.t())


def test_a_scale_the_first_guess_misses_is_found_among_its_float16_neighbours() -> None:
    """With an offset far larger than the block's range, max - m loses bits in float32, and
    (max - m) / 15 rounds to a float16 neighbour of the d the block was made with."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 2, 32), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's blocks hold their minimum and maximum
    d = (1e-3 + 1e-3 * torch.rand(16, 2, 1, generator=generator)).half().float()
    weight = (q * d - 1000.0).reshape(16, 64)
    x = weight.view(16, 2, 32)
    first = ((x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15).half().float()
    assert (first != d).sum() >= 8  # the first guess misses in many blocks
    found = BlockWeight.from_float(weight)
    assert found is not None and found.fmt == "q4_1"
    assert torch.equal(found.multiply(torch.eye(64)), weight.t())


@pytest.mark.parametrize("make", [q4_1_values, q8_0_values])
def test_one_value_off_the_grid_and_the_weight_stays_float32(make) -> None:
    weight = make(_weight())
    weight[40, 50] = _float16_step(weight[40, 50].item())
    assert BlockWeight.from_float(weight) is None


def test_weights_the_kernels_cannot_take_are_left_alone() -> None:
    weight = q4_1_values(_weight())
    assert BlockWeight.from_float(torch.randn(80, 96)) is None  # not a block format at all
    assert BlockWeight.from_float(weight[:72]) is None  # 72 outputs: not whole tiles of 16
    assert BlockWeight.from_float(weight[:, :80]) is None  # 80 inputs: not whole blocks of 32
    assert BlockWeight.from_float(weight.to(torch.bfloat16)) is None
    broken = weight.clone()
    broken[0, 0] = float("nan")
    assert BlockWeight.from_float(broken) is None


def test_the_packed_bytes_are_the_layout_the_kernel_comment_gives() -> None:
    """block_gemm.cpp: per (tile of 16 outputs, group of 32 inputs), float d[16], float m[16],
    then codes[p][j] = q[j][2p] | q[j][2p+1] << 4; Q8_0: float d[16], int8 codes[k][j]."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (32, 64), generator=generator, dtype=torch.uint8)
    d = torch.rand(32, 2, generator=generator)
    m = torch.rand(32, 2, generator=generator)
    blocks = pack_q4_1(q, d, m)
    assert blocks.shape == (2, 2, 384)
    tile, group, j, p = 1, 1, 5, 7  # output 16 + 5, inputs 32 + 14 and 32 + 15
    block = blocks[tile, group]
    assert block[:64].view(torch.float32)[j] == d[16 + j, group]
    assert block[64:128].view(torch.float32)[j] == m[16 + j, group]
    byte = block[128 + 16 * p + j].item()
    assert (byte & 15, byte >> 4) == (q[16 + j, 32 + 2 * p].item(), q[16 + j, 33 + 2 * p].item())
    q8 = torch.randint(-128, 128, (32, 64), generator=generator, dtype=torch.int8)
    blocks = pack_q8_0(q8, d)
    assert blocks.shape == (2, 2, 576)
    assert blocks[tile, group, :64].view(torch.float32)[j] == d[16 + j, group]
    assert blocks[tile, group, 64 + 16 * 9 + j].view(torch.int8) == q8[16 + j, 32 + 9]


def _merged(base: torch.Tensor, rank: int = 4, seed: int = 0) -> tuple[torch.Tensor, MergedLora]:
    generator = torch.Generator().manual_seed(seed)
    lora = MergedLora(
        a=0.1 * torch.randn(rank, base.shape[1], generator=generator),
        b=0.1 * torch.randn(base.shape[0], rank, generator=generator),
        scale=2.0,
    )
    return base + lora.delta(), lora


def _layer(weight: torch.Tensor, lora: MergedLora | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    if lora is not None:
        layer.merged_lora = lora
    return layer


def test_a_base_is_found_under_merged_lora_factors_and_multiplied_apart_from_them() -> None:
    base = q4_1_values(_weight())
    merged, lora = _merged(base)
    assert BlockWeight.from_float(merged) is None  # the merged values are no block format
    found = BlockWeight.for_layers(merged, [_layer(merged, lora)])
    assert found is not None and found.fmt == "q4_1"
    low = found.low_rank
    assert low.a.shape == (4, 96) and low.b.shape == (5 * 4 * 16,)  # 5 tiles of (rank, 16)
    assert low.tile_low.tolist() == [[0, 4, 64 * t] for t in range(5)]
    x = torch.randn(5, 96)
    torch.testing.assert_close(found.multiply(x), x @ merged.t())
    # the blocks hold the base itself: with the factors set aside, the one-hot rows show it
    plain = BlockWeight(found.fmt, found.blocks, 80, 96)
    assert torch.equal(plain.multiply(torch.eye(96)), base.t())


@pytest.mark.parametrize("rows", [1, 2, 3, 17])
def test_the_factors_are_added_in_every_tile_at_every_row_count(rows: int) -> None:
    # 29 tiles: each thread's share runs 8, 4, 2 and 1 tiles side by side at one row
    merged, lora = _merged(q4_1_values(_weight(16 * 29, 64, 6)), rank=3, seed=7)
    found = BlockWeight.for_layers(merged, [_layer(merged, lora)])
    x = torch.randn(rows, 64)
    torch.testing.assert_close(found.multiply(x), x @ merged.t())


def test_merged_weights_that_the_factors_do_not_explain_stay_float32() -> None:
    merged, lora = _merged(q4_1_values(_weight()))
    other = MergedLora(lora.a, lora.b, scale=1.0)  # the merge was done with another scale
    assert BlockWeight.for_layers(merged, [_layer(merged, other)]) is None
    merged[0, 0] = _float16_step(merged[0, 0].item())
    assert BlockWeight.for_layers(merged, [_layer(merged, lora)]) is None


def test_stacked_siblings_with_and_without_factors_share_one_low_rank_product() -> None:
    q_base, k_base = q4_1_values(_weight(48, 64, 1)), q4_1_values(_weight(16, 64, 2))
    v_weight = q4_1_values(_weight(16, 64, 3))
    q_weight, q_lora = _merged(q_base, rank=4, seed=4)
    k_weight, k_lora = _merged(k_base, rank=2, seed=5)
    layers = [_layer(q_weight, q_lora), _layer(k_weight, k_lora), _layer(v_weight)]
    stacked = torch.cat([q_weight, k_weight, v_weight])
    found = BlockWeight.for_layers(stacked, layers)
    assert found is not None
    # Each tile reads its own layer's columns of u = x @ a^T (q: 0-3, k: 4-5) and its b; v none.
    low = found.low_rank
    assert low.a.shape == (6, 64)
    assert low.tile_low.tolist() == [
        [0, 4, 0], [0, 4, 64], [0, 4, 128], [4, 2, 192], [6, 0, 224]
    ]  # fmt: skip
    assert torch.equal(low.b[:64].view(4, 16), (q_lora.b[:16] * 2.0).t())
    x = torch.randn(3, 64)
    torch.testing.assert_close(found.multiply(x), x @ stacked.t())


def test_the_single_stream_bound_counts_the_blocks_the_engine_reads() -> None:
    """The bench's bandwidth bound divides by the bytes a one-row step reads: the blocks (and
    factors) where the engine multiplies blocks at one row, not the float32 copies."""
    model, tokenizer = model_copy()
    make_gguf_like(model.language_model, lora_rank=4)
    full = weight_bytes_per_token(model.language_model)
    engine = Engine(model, tokenizer, EngineConfig(num_blocks=64, linear_kernels="blocks"))
    products = engine.runner.linears.products
    assert engine.runner.linears.choice.kernel_for(1) == "blocks"
    floats = sum(p.weight.numel() * 4 for p in products)
    blocks = sum(p.block_weight.num_bytes for p in products)
    assert (
        weight_bytes_per_token(model.language_model, engine.runner.linears)
        == full - floats + blocks
    )
    assert blocks < floats
    linear = Engine(*model_copy(), EngineConfig(num_blocks=64, linear_kernels="linear"))
    assert weight_bytes_per_token(linear.model.language_model, linear.runner.linears) == full


@pytest.mark.parametrize("winner", ["blocks", "packed"])
def test_block_copies_are_kept_only_when_blocks_are_chosen(winner: str, monkeypatch) -> None:
    def choose(products, kernels, **_):  # linear at one row, `winner` from 8 on
        assert "blocks" in kernels  # the block forms were found, so they were timed
        seconds = {
            1: {k: 1.0 if k == "linear" else 2.0 for k in kernels},
            8: {k: 1.0 if k == winner else 2.0 for k in kernels},
        }
        return KernelChoice.fastest(seconds), seconds

    monkeypatch.setattr(linear_kernels, "choose_kernels", choose)
    model, _ = model_copy()
    make_gguf_like(model.language_model)
    linears = EngineLinears(model.language_model, 2, kernels="auto", give_back=False)
    assert linears.choice.by_rows == {1: "linear", 8: winner}
    held = [p.block_weight is not None for p in linears.products]
    if winner == "blocks":
        assert all(held)
        assert linears.block_bytes == sum(p.block_weight.num_bytes for p in linears.products) > 0
    else:
        assert not any(held) and linears.block_bytes == 0
