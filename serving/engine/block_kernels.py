"""Build and call the engine's block-format products (`native/block_gemm.cpp`) on CPU.

The C++ files (the products, and the native decode pass that calls them, `native_decode.py`)
are compiled together once per machine with the system's g++ (`-march=native`, OpenMP) into
a cache folder and loaded with ctypes; a build takes ~5 s and is reused while the sources, the
flags, the compiler and the CPU stay the same. No torch headers are involved, so the build needs
only a C++ compiler; the library links OpenMP by soname and so runs on torch's own OpenMP
threads inside the process (checked: one libgomp is mapped after loading it).

Where the cache folder cannot be written, the library is built in the temp folder instead.
Where there is no compiler, or the build fails, `library()` logs why and returns None, and the
engine multiplies the float32 weights as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# The block products, and the native decode pass that calls them (native_decode.py): one library.
SOURCES = tuple(Path(__file__).parent / "native" / f for f in ("block_gemm.cpp", "decode_pass.cpp"))
# -ffp-contract=fast: a * b + c as one fused multiply-add (GCC's default for GNU dialects, not
# for -std=c++17); the kernel's sums rely on it for speed, its exactness does not (see the .cpp).
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# The formats the library multiplies, by their llama.cpp names (see block_weights.py).
FORMATS = ("q4_1", "q8_0")
CACHE_ENV = "VISUALCHAT_NATIVE_CACHE"  # where built libraries are kept (default ~/.cache/...)
# The kernel's layout (block_gemm.cpp): blocks of GROUP inputs by TILE outputs.
GROUP = 32
TILE = 16


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "visualchat" / "native"
    return Path(os.environ.get(CACHE_ENV) or default)


def _cpu_flags() -> str:
    """Part of the build key: machines share home folders, and a library built for one CPU's
    instructions (-march=native) must not load on another."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build(compiler: str) -> Path:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(
        "\0".join(
            [*(s.read_text() for s in SOURCES), " ".join(FLAGS), version, _cpu_flags()]
        ).encode()
    ).hexdigest()[:16]
    name = f"block_gemm-{key}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"visualchat-native-{os.getuid()}"):
        target = folder / name
        if target.exists():
            return target
        try:  # a cache folder that cannot be written (a read-only home): the temp folder then
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                break
        except OSError:
            logger.info("cannot write the kernel cache %s; trying the temp folder", folder)
    # Built beside the target and renamed into place: a concurrent process never loads half
    # a library, and two builds race only to write the same file.
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", partial, *map(str, SOURCES)],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("built the block-format kernels: %s", target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None (and why, logged) where they cannot be."""
    if platform.machine() not in ("x86_64", "AMD64"):
        logger.info("block-format kernels: written for x86-64, this is %s", platform.machine())
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("block-format kernels unavailable: no C++ compiler (g++ or $CXX)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        logger.warning("block-format kernels unavailable: the build failed: %s", detail[-2000:])
        return None
    for name in ("vc_q4_1_gemm", "vc_q8_0_gemm"):
        function = getattr(lib, name)
        function.argtypes = [
            ctypes.c_void_p,  # x: (m, k) float32
            ctypes.c_int64,  # m
            ctypes.c_int64,  # k
            ctypes.c_void_p,  # blocks
            ctypes.c_int64,  # n
            ctypes.c_void_p,  # y: (m, n) float32
            ctypes.c_void_p,  # lora_a: (rank, k) float32, or null
            ctypes.c_int64,  # rank (0: no low-rank term)
            ctypes.c_void_p,  # tile_low: (n / 16, 3) int64, or null
            ctypes.c_void_p,  # lora_b: per tile (its rank, 16) float32, or null
        ]
        function.restype = None
    lib.vc_decode_pass.argtypes = [
        ctypes.c_void_p,  # hidden: (m, hidden) float32, updated in place
        ctypes.c_int64,  # m
        ctypes.c_void_p,  # layers: (num_layers, vc_decode_layer_entries()) int64
        ctypes.c_int64,  # num_layers
        ctypes.c_void_p,  # shape: hidden, heads, kv heads, head dim, intermediate (int64)
        ctypes.c_void_p,  # eps, scaling (float32)
        ctypes.c_void_p,  # cos: (m, head_dim) float32
        ctypes.c_void_p,  # sin: (m, head_dim) float32
        ctypes.c_void_p,  # new_slots: (m,) int64
        ctypes.c_void_p,  # positions: (m,) int64
        ctypes.c_void_p,  # key_slots: (m, key_stride) int64
        ctypes.c_int64,  # key_stride
        ctypes.c_void_p,  # parts: (m, key_stride) uint8, see vc_decode_attention
    ]
    lib.vc_decode_pass.restype = None
    lib.vc_decode_attention.argtypes = [
        ctypes.c_void_p,  # q: the pass's queries, float32
        ctypes.c_void_p,  # rows: (m,) int64, the query row of each attending row
        ctypes.c_int64,  # q_stride: floats from one query row to the next
        ctypes.c_int64,  # m
        ctypes.c_void_p,  # keys: (slots, kv heads, head_dim) float32
        ctypes.c_void_p,  # values: same
        ctypes.c_void_p,  # key_slots: (m, key_stride) int64
        ctypes.c_int64,  # key_stride
        ctypes.c_void_p,  # counts: (m,) int64
        ctypes.c_void_p,  # parts: (m, key_stride) uint8
        ctypes.c_int64,  # heads
        ctypes.c_int64,  # kv heads
        ctypes.c_int64,  # head_dim
        ctypes.c_float,  # scaling
        ctypes.c_void_p,  # out: (m, heads, head_dim) float32
    ]
    lib.vc_decode_attention.restype = None
    lib.vc_exp16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]  # x, n, y
    lib.vc_exp16.restype = None
    for name in ("vc_q4_1_block_bytes", "vc_q8_0_block_bytes", "vc_decode_layer_entries"):
        getattr(lib, name).restype = ctypes.c_int64
    return lib


def available() -> bool:
    return library() is not None


def block_bytes(fmt: str) -> int:
    """Bytes of one (TILE outputs, GROUP inputs) block of `fmt` in the library's layout."""
    lib = library()
    if lib is None:
        raise RuntimeError("the block-format kernels are not available here (see the log)")
    return getattr(lib, f"vc_{fmt}_block_bytes")()


@dataclass(frozen=True)
class LowRank:
    """A low-rank term (x @ a^T) @ b added to a block product, laid out for the kernel: the
    stacked layers' a's one above the other, and per output tile of 16 the columns of u = x @ a^T
    that its layer owns and its layer's b for those 16 outputs (see `Rows` in block_gemm.cpp)."""

    a: torch.Tensor  # (rank, k) float32
    tile_low: torch.Tensor  # (n / 16, 3) int64: first column of u, rank, offset into b
    b: torch.Tensor  # (sum over tiles of their rank * 16,) float32

    def __post_init__(self) -> None:
        if not all(t.is_contiguous() for t in (self.a, self.tile_low, self.b)):
            raise ValueError("the low-rank factors must be contiguous")
        if self.a.dtype != torch.float32 or self.b.dtype != torch.float32:
            raise ValueError("the low-rank factors must be float32")
        if self.tile_low.dtype != torch.int64 or self.tile_low.shape[1:] != (3,):
            raise ValueError("tile_low must be (tiles, 3) int64")
        starts, ranks, offsets = self.tile_low.unbind(1)
        if bool(
            (starts + ranks > self.a.shape[0]).any() | (offsets + TILE * ranks > len(self.b)).any()
        ):
            raise ValueError("tile_low points outside the factors")

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.tile_low, self.b))


def product(
    fmt: str, blocks: torch.Tensor, out_features: int, low_rank: LowRank | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """multiply(x): (m, k) float32 @ W^T -> (m, out_features), W held as `fmt` blocks
    (block_weights.py), plus the low-rank term when there is one, in the same call. Checked and
    bound here once: a decode step makes ~120 of these calls, and their Python is most of a
    small one's time (bound: 7 us a call on a 16 x 32 weight, 4 of them the ctypes call itself;
    checked per call as before: 10 us)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the block-format kernels are not available here (see the log)")
    if fmt not in FORMATS:
        raise ValueError(f"unknown block format {fmt!r}; known: {FORMATS}")
    if blocks.dim() != 3 or blocks.dtype != torch.uint8 or not blocks.is_contiguous():
        raise ValueError("blocks must be (tiles, groups, block bytes) contiguous uint8")
    if blocks.shape[0] * TILE != out_features or blocks.shape[2] != block_bytes(fmt):
        raise ValueError(f"{tuple(blocks.shape)} blocks do not hold {out_features} {fmt} outputs")
    k = blocks.shape[1] * GROUP
    low = (None, 0, None, None)
    if low_rank is not None:
        if low_rank.a.shape[1] != k or low_rank.tile_low.shape[0] != blocks.shape[0]:
            raise ValueError("the low-rank factors do not fit this product")
        a, tile_low, b = low_rank.a, low_rank.tile_low, low_rank.b
        low = (a.data_ptr(), a.shape[0], tile_low.data_ptr(), b.data_ptr())
    function, weights = getattr(lib, f"vc_{fmt}_gemm"), blocks.data_ptr()

    def multiply(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"the block kernels take (rows, {k}) float32 CPU inputs")
        x = x.contiguous()
        y = torch.empty(x.shape[0], out_features)
        if x.shape[0]:
            function(x.data_ptr(), x.shape[0], k, weights, out_features, y.data_ptr(), *low)
        return y

    multiply.holds = (blocks, low_rank)  # the memory behind the bound pointers stays alive
    return multiply


def gemm(
    fmt: str,
    x: torch.Tensor,
    blocks: torch.Tensor,
    out_features: int,
    low_rank: LowRank | None = None,
) -> torch.Tensor:
    """One product at once: `product(fmt, blocks, out_features, low_rank)(x)`."""
    return product(fmt, blocks, out_features, low_rank)(x)
