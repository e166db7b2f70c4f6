"""The block-format kernels: built once per machine, loaded into torch's OpenMP, any row count."""

from __future__ import annotations

import logging

import pytest
import torch
from block_formats import q4_1_values, q8_0_values

from serving.engine import block_kernels
from serving.engine.block_weights import BlockWeight

needs_compiler = pytest.mark.skipif(
    block_kernels._compiler() is None, reason="the block kernels need a C++ compiler (g++)"
)


@pytest.fixture
def fresh_library(tmp_path, monkeypatch):
    """`library()` as on first use, building into an empty cache folder."""
    monkeypatch.setenv(block_kernels.CACHE_ENV, str(tmp_path))
    block_kernels.library.cache_clear()
    yield tmp_path
    block_kernels.library.cache_clear()


@needs_compiler
@pytest.mark.parametrize("make", [q4_1_values, q8_0_values])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("tiles", [5, 29])
def test_every_row_count_computes_the_product(make, rows: int, tiles: int) -> None:
    # 5 tiles of 16 outputs: each thread's share is finished by the kernels that take 2 tiles
    # side by side or one; 29: shares of 14 and 15, so one row also runs 8 and 4 side by side
    weight = make(torch.randn(16 * tiles, 64, generator=torch.Generator().manual_seed(rows)))
    found = BlockWeight.from_float(weight)
    x = torch.randn(rows, 64)
    out = found.multiply(x)
    assert out.shape == (rows, 16 * tiles)
    torch.testing.assert_close(out, x @ weight.t())


@needs_compiler
def test_inputs_of_the_wrong_kind_are_refused() -> None:
    found = BlockWeight.from_float(q4_1_values(torch.randn(16, 32)))
    with pytest.raises(ValueError, match="float32"):
        found.multiply(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown block format"):
        block_kernels.gemm("q5_k", torch.randn(2, 32), found.blocks, 16)


@needs_compiler
def test_the_library_is_built_once_and_runs_on_torchs_openmp(fresh_library) -> None:
    assert block_kernels.library() is not None
    built = sorted(fresh_library.glob("block_gemm-*.so"))
    assert len(built) == 1 and not list(fresh_library.glob("*.partial"))
    modified = built[0].stat().st_mtime_ns
    block_kernels.library.cache_clear()
    assert block_kernels.library() is not None  # a new process would load the same file
    assert sorted(fresh_library.glob("block_gemm-*.so")) == built
    assert built[0].stat().st_mtime_ns == modified
    with open("/proc/self/maps") as maps:
        openmp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(openmp) == 1  # torch's own, not a second runtime competing for the cores


@needs_compiler
def test_a_changed_source_is_built_again(fresh_library, tmp_path_factory, monkeypatch) -> None:
    assert block_kernels.library() is not None
    first, *rest = block_kernels.SOURCES
    source = tmp_path_factory.mktemp("src") / first.name
    source.write_text(first.read_text() + "\n// changed\n")
    monkeypatch.setattr(block_kernels, "SOURCES", (source, *rest))
    block_kernels.library.cache_clear()
    assert block_kernels.library() is not None
    assert len(list(fresh_library.glob("block_gemm-*.so"))) == 2


def test_without_a_compiler_the_kernels_are_unavailable_and_say_why(
    fresh_library, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with caplog.at_level(logging.WARNING, logger="serving.engine.block_kernels"):
        assert block_kernels.library() is None
    assert "no C++ compiler" in caplog.text
    assert not block_kernels.available()
    with pytest.raises(RuntimeError, match="not available"):
        block_kernels.gemm(
            "q4_1", torch.randn(1, 32), torch.zeros(1, 1, 384, dtype=torch.uint8), 16
        )


def test_a_failed_build_leaves_nothing_behind_and_says_why(
    fresh_library, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with caplog.at_level(logging.WARNING, logger="serving.engine.block_kernels"):
        assert block_kernels.library() is None
    assert "the build failed" in caplog.text
    assert list(fresh_library.iterdir()) == []


def test_low_rank_factors_that_do_not_fit_are_refused() -> None:
    a, b = torch.randn(4, 32), torch.randn(2 * 4 * 16)
    tiles = torch.tensor([[0, 4, 0], [0, 4, 64]])
    block_kernels.LowRank(a, tiles, b)  # fits: 2 tiles of (4, 16)
    with pytest.raises(ValueError, match="outside"):
        block_kernels.LowRank(a, torch.tensor([[0, 4, 0], [2, 4, 64]]), b)  # u columns 2..5 of 4
    with pytest.raises(ValueError, match="outside"):
        block_kernels.LowRank(a, torch.tensor([[0, 4, 0], [0, 4, 96]]), b)  # b past its end
    with pytest.raises(ValueError, match="float32"):
        block_kernels.LowRank(a.double(), tiles, b)
    with pytest.raises(ValueError, match="int64"):
        block_kernels.LowRank(a, tiles.int(), b)
    with pytest.raises(ValueError, match="contiguous"):
        block_kernels.LowRank(torch.randn(32, 4).t(), tiles, b)


@needs_compiler
def test_blocks_and_inputs_that_do_not_fit_are_refused_before_the_kernel_reads_them() -> None:
    found = BlockWeight.from_float(q4_1_values(torch.randn(32, 64)))
    multiply = block_kernels.product("q4_1", found.blocks, 32)
    with pytest.raises(ValueError, match=r"\(rows, 64\)"):
        multiply(torch.randn(2, 32))  # a row shorter than the weight's inputs
    with pytest.raises(ValueError, match="do not hold"):
        block_kernels.product("q4_1", found.blocks, 48)  # more outputs than the blocks hold
    with pytest.raises(ValueError, match="do not hold"):
        block_kernels.product("q8_0", found.blocks, 32)  # Q4_1 blocks read as Q8_0
    with pytest.raises(ValueError, match="uint8"):
        block_kernels.product("q4_1", found.blocks.view(torch.int8), 32)


@needs_compiler
def test_a_cache_folder_that_cannot_be_made_falls_back_to_the_temp_folder(
    tmp_path, monkeypatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(block_kernels.CACHE_ENV, str(blocker / "cache"))  # under a file
    monkeypatch.setattr(block_kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    block_kernels.library.cache_clear()
    try:
        assert block_kernels.library() is not None
        assert list((tmp_path / "tmp").glob("visualchat-native-*/block_gemm-*.so"))
    finally:
        block_kernels.library.cache_clear()
