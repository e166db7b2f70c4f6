"""Fused dequantize-matmul in Triton: y = x @ deq(W)^T with W read from its packed planes.

Design note. Each program computes a (BLOCK_M, BLOCK_N) tile of y and walks K in BLOCK_K steps.
For each step it loads the bytes of the packed planes that hold the tile's codes (element j of
the row-major weight is in byte j // (8 / bits) at shift (j % (8 / bits)) * bits, see
`packing.py`), reassembles the codes, decodes them through the format's value table, applies
the zero point and scale of the element's group in float32 -- the same operations, in the same
order, as the CPU path -- and feeds the tile to tl.dot in the activation dtype with a float32
accumulator. The full-precision weight is never written to memory: HBM traffic for the weight
is its packed size, which is what makes weight-only quantization pay off in memory-bound
decoding (FP6-LLM). The layout is the portable row-major one, not FP6-LLM's tensor-core
pre-shuffled one, so this is a correct and memory-lean kernel rather than a tuned one.

The kernel is built on first use (`triton.jit` at call time), which lets tests build it under
Triton's CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from visualchat.quant.packing import LAYOUTS
from visualchat.quant.tensor import group_size_of, value_table


def _quant_matmul_kernel(
    x_ptr,
    low_ptr,
    high_ptr,
    table_ptr,
    scale_ptr,
    zero_ptr,
    y_ptr,
    M,
    N,
    K,
    num_groups,
    group_size,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    LOW_BITS: tl.constexpr,
    HIGH_BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of x
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output channels
    # tl.full, not tl.zeros: builtins only, so the kernel also runs under the interpreter when
    # triton was imported without TRITON_INTERPRET (the standard library's jit functions do not).
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0
        )
        w_mask = (rn[:, None] < N) & (rk[None, :] < K)  # (BN, BK)
        index = rn[:, None].to(tl.int64) * K + rk[None, :]  # element index in row-major W
        low = tl.load(low_ptr + index // (8 // LOW_BITS), mask=w_mask, other=0).to(tl.int32)
        low_shift = ((index % (8 // LOW_BITS)) * LOW_BITS).to(tl.int32)
        code = (low >> low_shift) & ((1 << LOW_BITS) - 1)
        if HIGH_BITS > 0:
            high = tl.load(high_ptr + index // (8 // HIGH_BITS), mask=w_mask, other=0).to(tl.int32)
            high_shift = ((index % (8 // HIGH_BITS)) * HIGH_BITS).to(tl.int32)
            code = code | (((high >> high_shift) & ((1 << HIGH_BITS) - 1)) << LOW_BITS)
        w = tl.load(table_ptr + code)  # (BN, BK) float32
        group = rn[:, None] * num_groups + rk[None, :] // group_size
        if HAS_ZERO:
            w = w - tl.load(zero_ptr + group, mask=w_mask, other=0).to(tl.float32)
        w = w * tl.load(scale_ptr + group, mask=w_mask, other=0.0)
        w = w.to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


_KERNELS: dict[bool, object] = {}


def _kernel(interpret: bool):
    """The jitted kernel; interpret=True builds it for Triton's CPU interpreter."""
    if interpret not in _KERNELS:
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            _KERNELS[interpret] = triton.jit(_quant_matmul_kernel)
    return _KERNELS[interpret]


def quant_matmul(
    x: torch.Tensor,  # (M, K) activations
    codes_low: torch.Tensor,  # packed wide plane (uint8)
    codes_high: torch.Tensor | None,  # packed narrow plane (uint8) or None
    scales: torch.Tensor,  # (N, num_groups) float32
    zeros: torch.Tensor | None,  # (N, num_groups) uint8 or None
    fmt: str,
    out_features: int,
    interpret: bool = False,  # run under Triton's interpreter (CPU tensors)
    block_sizes: tuple[int, int, int] | None = None,  # (BLOCK_M, BLOCK_N, BLOCK_K)
) -> torch.Tensor:
    """(M, N) = x @ deq(W)^T in x's dtype, float32 accumulation (IEEE for float32 inputs)."""
    if x.dim() != 2:
        raise ValueError(f"quant_matmul expects 2-D activations, got {tuple(x.shape)}")
    layout = LAYOUTS[fmt]
    num_rows, in_features = x.shape
    y = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return y
    if block_sizes is None:
        block_m = 16 if num_rows <= 16 else 64
        block_sizes = (block_m, 64, 64)
    block_m, block_n, block_k = block_sizes
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(out_features, block_n))
    _kernel(interpret)[grid](
        x,
        codes_low,
        codes_high if codes_high is not None else codes_low,
        value_table(fmt, x.device),
        scales,
        zeros if zeros is not None else codes_low,
        y,
        num_rows,
        out_features,
        in_features,
        scales.shape[1],
        group_size_of(fmt, in_features),
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        LOW_BITS=layout.low_bits,
        HIGH_BITS=layout.high_bits,
        HAS_ZERO=zeros is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y
