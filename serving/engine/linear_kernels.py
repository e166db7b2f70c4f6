"""The engine's float32 linear layers on CPU: for each pass size, the faster of two kernels on
this machine, chosen by timing them at start-up.

Why. A pass multiplies a handful of rows (decode) to a few hundred (prompt chunks) by every
weight matrix, and on CPU how fast that runs depends on the machine, not only on the sizes:

- "linear": torch's own `linear`. On one development host (A) its one-row product (MKL's gemv)
  read the weights on one thread, ~12 GB/s against ~36 GB/s for two; on another (B) it reads at
  that host's full ~20 GB/s.
- "rows": each weight viewed, as it is, as one block of output rows per thread, multiplied as
  one `bmm`: 36-42 GB/s with one row on host A, but ~8 GB/s on host B.
- "packed": oneDNN's inner product over a copy of each weight packed once into oneDNN's blocked
  layout (what inductor's CPU weight freezing does). MKL's float32 `mm` is far from both bounds
  with a few rows (8 rows cost 2-2.5x one on host B); through packed weights decode steps of 8
  and 16 sequences took 0.76x and 0.84x the time on host B (`benchmarks/engine_ab.py`,
  interleaved with `linear`), with the same greedy tokens. With one row it is slower than
  `linear`. The cost is the packed copy, as large as the weights; when "auto" does not pick it
  at any size the copies are dropped at once.
- "blocks": for weights that are exactly a GGUF block format (Q4_1, Q8_0; with merged LoRA
  factors set apart), the block kernels over those blocks (`block_weights.py`,
  `block_kernels.py`): a fifth of the bytes. On host B a pass over the embedded default took
  0.33x the best float32 kernel's time with one row, 0.48x with 8, 0.71x with 16, and about as
  long or longer from 32 rows on (`benchmarks/block_kernels_pass.py`). Products without a block
  form run `linear` under it.

MKL's own packed sgemm (`torch.ops.mkl._mkl_linear`) was tried and dropped. It packs for one exact
row count and runs plain `linear` for any other; packed for the count it runs, it was 10-20% faster
than "packed" at exactly 8 or 16 rows on host B, but no faster with the rows padded up to it, so it
would need a copy of the weights per decode batch size.

How. While the engine holds the model, every float32 `nn.Linear` of the backbone runs its forward
here. Siblings that read the same input (q/k/v, gate/up) get their weights stacked in one storage,
each weight a contiguous row range of it, so each group is one product. `choose_kernels` times
one pass over all of them per kernel at a few pass sizes (the median of a few passes) and each
pass size then uses the kernel that was fastest at the nearest timed size, `linear` unless
another beats it by more than 20%; where `linear` wins at every size, the layers are given back
at once (torch's own layers are a little faster than `linear` through this module). `release`
gives every layer its own forward and every stacked weight its own storage back.

The sums are the same dot products in other kernels, so results can differ from `linear` in the
last bits; the engine's greedy output still equals the reference decoder's in the tests and the
benchmark, which check it for every kernel.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from serving.engine import block_kernels
from serving.engine.block_weights import BlockWeight

logger = logging.getLogger(__name__)

KERNELS = ("linear", "rows", "packed", "blocks")
# Pass sizes timed at start-up: a one-stream decode, a decode batch, a prompt chunk.
TIMED_ROWS = (1, 8, 64)
# Another kernel replaces torch's `linear` only when it is this much faster (a fraction of
# linear's time): on the shared 2-core machine timings of the same pass swing by ~12% from run
# to run, while the differences worth acting on are 2-3x (rows at one row, either way by host).
NEAR_TIE = 0.2

# Sibling layers that read the same input one after another in the usual decoder blocks
# (transformers' Llama, Mistral, Qwen2, ...): their weights are stacked in one storage and read by
# one product, so a decode pass makes 4 products per layer instead of 7 (fewer, larger reads).
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel runs a pass of a given number of rows: the one picked at the timed size
    nearest to it on a log scale (1 row is a decode of one stream; 8 a decode batch; ...)."""

    by_rows: dict[int, str]  # timed pass size -> kernel
    # rows -> kernel, filled as passes come (every layer of a pass asks; the logs cost more)
    _known: dict[int, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.by_rows.values()) - set(KERNELS)
        if not self.by_rows or unknown:
            raise ValueError(f"a kernel choice needs sizes and kernels of {KERNELS}")

    @classmethod
    def always(cls, kernel: str) -> KernelChoice:
        return cls({1: kernel})

    @classmethod
    def fastest(
        cls, seconds: dict[int, dict[str, float]], margin: float = NEAR_TIE
    ) -> KernelChoice:
        """From timings {rows: {kernel: seconds per pass}}: the fastest kernel per size, but
        torch's `linear` unless another is faster by more than `margin` (a fraction of
        linear's time): a near tie on a noisy machine is no reason to leave torch's own kernel."""
        by_rows = {}
        for rows, by_kernel in seconds.items():
            best = min(by_kernel, key=by_kernel.get)
            if "linear" in by_kernel and by_kernel[best] > (1 - margin) * by_kernel["linear"]:
                best = "linear"
            by_rows[rows] = best
        return cls(by_rows)

    def kernel_for(self, rows: int) -> str:
        kernel = self._known.get(rows)
        if kernel is None:
            distance = lambda timed: abs(math.log(timed) - math.log(max(rows, 1)))  # noqa: E731
            kernel = self._known[rows] = self.by_rows[min(self.by_rows, key=distance)]
        return kernel

    @property
    def kernels(self) -> set[str]:
        return set(self.by_rows.values())


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (private ops inductor uses)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 (the lookup raises when missing)
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class _Product:
    """One weight product of the backbone: a layer's own weight, or the stacked weights of
    siblings (row ranges of one (sum of outs, in) storage). The first call on an input computes
    every member's output; each member then takes its own. A member called on another input (or
    twice on the same one) recomputes, so the result never depends on the call order."""

    def __init__(self, layers: list[nn.Linear], parts: int) -> None:
        self.layers = layers
        self.stacked = len(layers) > 1
        self.bounds: list[tuple[int, int]] = []  # each member's output rows in the storage
        for layer in layers:
            start = self.bounds[-1][1] if self.bounds else 0
            self.bounds.append((start, start + layer.out_features))
        if self.stacked:
            storage = torch.cat([layer.weight.data for layer in layers])  # (sum of outs, in)
            for layer, (start, end) in zip(layers, self.bounds, strict=True):
                layer.weight.data = storage[start:end]  # contiguous rows
        else:
            storage = layers[0].weight.data
        self.weight = storage  # (out, in)
        # "rows": (parts, out / parts, in), block p is output rows p*out/parts.. of the weight
        out_features = storage.shape[0]
        self.row_parts = (
            storage.view(parts, -1, storage.shape[1]) if out_features % parts == 0 else None
        )
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy, for "packed"
        self.block_weight: BlockWeight | None = None  # the exact block form, for "blocks"
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)

    def find_blocks(self) -> None:
        self.block_weight = BlockWeight.for_layers(self.weight, self.layers)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def multiply(self, rows: torch.Tensor, kernel: str) -> torch.Tensor:
        """(m, in) @ weight.T -> (m, out), by `kernel` when this product supports it."""
        if rows.shape[0] == 0:  # e.g. the head of a pass that samples nothing
            return rows.new_empty(0, self.weight.shape[0])
        if kernel == "packed" and self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")
        if kernel == "blocks" and self.block_weight is not None:
            return self.block_weight.multiply(rows)
        if kernel == "rows" and self.row_parts is not None:
            columns = rows.t().unsqueeze(0).expand(self.row_parts.shape[0], -1, -1)  # (p, in, m)
            out = torch.bmm(self.row_parts, columns)  # (parts, out / parts, m)
            return out.permute(2, 0, 1).reshape(rows.shape[0], self.weight.shape[0])  # (m, out)
        return torch.nn.functional.linear(rows, self.weight)

    def _multiply_input(self, x: torch.Tensor, choice: KernelChoice) -> torch.Tensor:
        """(..., in) -> (m, out) for the m rows of x, by the kernel chosen for m rows."""
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (m, in)
        return self.multiply(rows, choice.kernel_for(rows.shape[0]))

    def output(self, layer: nn.Linear, x: torch.Tensor, choice: KernelChoice) -> torch.Tensor:
        if not self.stacked:  # a layer of its own: nothing to share, so nothing to keep
            out = self._multiply_input(x, choice)  # (m, out)
            out = out.view(*x.shape[:-1], out.shape[-1])
            return out if layer.bias is None else out + layer.bias
        if self.input is not x or id(layer) not in self.outputs:
            full = self._multiply_input(x, choice)  # (m, sum of outs)
            self.outputs = {}
            for member, (start, end) in zip(self.layers, self.bounds, strict=True):
                out = full[:, start:end].reshape(*x.shape[:-1], end - start).contiguous()
                self.outputs[id(member)] = out if member.bias is None else out + member.bias
            self.input = x
        out = self.outputs.pop(id(layer))
        if not self.outputs:
            self.input = None  # everyone has theirs: hold no activations between passes
        return out


def _engine_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.engine_product.output(self, x, self.engine_linears.choice)


class EngineLinears:
    """Switch a module's float32 `nn.Linear` layers to the engine's kernels until `release`.

    `kernels`: "auto" (time them here, see `choose_kernels`) or one of KERNELS for every size.
    `give_back`: under "auto", hand the layers back at once where `linear` wins at every size.
    `blocks`: under "auto", also time the block kernels on the weights that are exactly a block
    format (see block_weights.py).
    """

    def __init__(
        self,
        module: nn.Module,
        parts: int,
        kernels: str = "auto",
        fuse: Sequence[Sequence[str]] = FUSED_SIBLINGS,
        give_back: bool = True,
        blocks: bool = True,
    ) -> None:
        if parts < 1:
            raise ValueError(f"need at least 1 part, got {parts}")
        if kernels not in ("auto", *KERNELS):
            raise ValueError(f"kernels must be 'auto' or one of {KERNELS}, got {kernels!r}")
        self.parts = parts
        self.products: list[_Product] = []
        self.layers: list[nn.Linear] = []
        with torch.no_grad():
            grouped = self._stack_siblings(module, fuse)
            for layer in module.modules():
                if self._eligible(layer) and id(layer) not in grouped:
                    self._install(_Product([layer], parts))
        self.num_stacked = sum(p.stacked for p in self.products)
        can_pack = packing_available()
        if kernels == "packed" and not can_pack:
            raise ValueError("the packed kernel needs a torch build with oneDNN (mkldnn)")
        if kernels == "blocks" and not block_kernels.available():
            raise ValueError("the blocks kernel needs a C++ compiler to build it (see the log)")
        candidates = [k for k in KERNELS if k not in ("packed", "blocks")]
        if can_pack:
            candidates.append("packed")
        if kernels in ("auto", "packed") and can_pack:
            with torch.no_grad():
                for product in self.products:
                    product.pack()
        if (kernels == "blocks" or (kernels == "auto" and blocks)) and block_kernels.available():
            for product in self.products:
                product.find_blocks()
            if any(product.block_weight is not None for product in self.products):
                candidates.append("blocks")
        if kernels == "auto":
            self.choice, self.seconds = choose_kernels(self.products, kernels=candidates)
        else:
            self.choice, self.seconds = KernelChoice.always(kernels), {}
        for product in self.products:  # a copy not chosen at any size is not kept
            if "packed" not in self.choice.kernels:
                product.packed = None
            if "blocks" not in self.choice.kernels:
                product.block_weight = None
        logger.info(
            "%d linear layers in %d products (%d sibling groups stacked, %d in block formats); "
            "kernels by pass rows: %s",
            len(self.layers),
            len(self.products),
            self.num_stacked,
            sum(p.block_weight is not None for p in self.products),
            self.choice.by_rows,
        )
        if give_back and kernels == "auto" and self.choice.kernels == {"linear"}:
            # torch's own layers run the same products without the stacking's slices and this
            # module's bookkeeping: 2.5-5.5% faster decode steps on host B (benchmarks/
            # engine_ab.py, 1 and 16 sequences), so when rows never wins they get them back.
            # give_back=False: the caller multiplies through the products itself (the lean
            # forward), where one stacked product is the cheaper way.
            self.release()
            logger.info("linear wins at every pass size: torch's own layers kept")

    def _install(self, product: _Product) -> None:
        self.products.append(product)
        for layer in product.layers:
            layer.engine_product = product
            layer.engine_linears = self
            layer.forward = types.MethodType(_engine_forward, layer)
            self.layers.append(layer)

    def _stack_siblings(self, module: nn.Module, fuse: Sequence[Sequence[str]]) -> set[int]:
        grouped: set[int] = set()
        for parent in module.modules():
            for names in fuse:
                layers = [getattr(parent, name, None) for name in names]
                if (
                    not all(self._eligible(layer) for layer in layers)
                    or len({layer.in_features for layer in layers}) != 1
                    or len({id(layer.weight) for layer in layers}) != len(layers)
                ):
                    continue
                self._install(_Product(layers, self.parts))
                grouped.update(id(layer) for layer in layers)
        return grouped

    @staticmethod
    def _eligible(layer: nn.Module | None) -> bool:
        # Exactly nn.Linear: quantized and adapter layers are subclasses or other classes with
        # their own kernels. float32 only: bf16/fp16 matmuls go to oneDNN, which threads already.
        return (
            type(layer) is nn.Linear
            and layer.weight.dtype == torch.float32
            and layer.weight.device.type == "cpu"
            and layer.weight.is_contiguous()
        )

    def release(self) -> None:
        """Give every layer its own forward and every stacked weight its own storage back."""
        with torch.no_grad():
            for product in self.products:
                for layer in product.layers:
                    del layer.forward, layer.engine_product, layer.engine_linears
                    if product.stacked:
                        layer.weight.data = layer.weight.data.clone()  # savable on its own again
                product.packed = None
                product.block_weight = None
        self.products, self.layers = [], []

    @property
    def packed_bytes(self) -> int:
        """Memory held by packed copies of the weights (0 unless "packed" was chosen)."""
        return sum(
            p.weight.numel() * p.weight.element_size()
            for p in self.products
            if p.packed is not None
        )

    @property
    def block_bytes(self) -> int:
        """Memory held by block-format copies of the weights (0 unless "blocks" was chosen)."""
        return sum(p.block_weight.num_bytes for p in self.products if p.block_weight is not None)


def time_pass(products: Sequence[_Product], kernel: str, rows: int) -> float:
    """Seconds of one pass of `rows` rows through every product, by `kernel`."""
    inputs = {p.in_features: torch.randn(rows, p.in_features) for p in products}
    started = time.perf_counter()
    for product in products:
        product.multiply(inputs[product.in_features], kernel)
    return time.perf_counter() - started


def choose_kernels(
    products: Sequence[_Product],
    sizes: Sequence[int] = TIMED_ROWS,
    rounds: int = 5,
    timer: Callable[[Sequence[_Product], str, int], float] = time_pass,
    kernels: Sequence[str] = KERNELS,
) -> tuple[KernelChoice, dict[int, dict[str, float]]]:
    """Time every kernel at every pass size over all products (every weight is read, as in a
    real pass, so the timing sees memory, not a cached matrix) and keep the fastest per size.
    The kernels take turns, one pass each per round, so a slow moment of a shared machine falls
    on all of them; each gets the median of its rounds, after one untimed warm-up pass."""
    with torch.no_grad():
        seconds: dict[int, dict[str, float]] = {}
        for rows in sizes:
            passes: dict[str, list[float]] = {k: [] for k in kernels}
            for round_ in range(rounds + 1):
                for kernel in kernels:
                    elapsed = timer(products, kernel, rows)
                    if round_:
                        passes[kernel].append(elapsed)
            seconds[rows] = {k: statistics.median(times) for k, times in passes.items()}
        choice = KernelChoice.fastest(seconds)
    logger.info(
        "linear kernels timed (ms per pass): %s",
        {r: {k: round(1e3 * s, 1) for k, s in by.items()} for r, by in seconds.items()},
    )
    return choice, seconds
