"""The decode pass in native code: every layer of a decode-only pass in one call.

Why. With the block kernels a one-row decode step of the embedded default took ~27 ms on host
B, of which the block products were ~12 ms; the rest was the lean forward's Python and its ~50
small torch ops per layer (norms, rotary, cache writes, attention glue) and ~120 kernel calls
through ctypes (`benchmarks/engine_ab.py`, README). A decode step's arithmetic besides the
products is small (one row of norms and rotations; attention over the cached keys), so
written out in C++ (`native/decode_pass.cpp`) the step is close to its weight reads: a one-row
step took 0.45x the time of the lean forward's, interleaved (10.0 against 22.0 ms), and 0.64x
at 1,520 cached positions, where attention is a larger share (README, "Serving").

When. A pass in which every scheduled chunk is one token (decode steps, the common case while
streams run), on a Llama-family backbone the lean forward runs, whose every product the engine
holds in a block format and multiplies by the block kernels at that pass size, with SiLU MLPs,
one norm epsilon and a float32 cache. Anything else runs the lean forward as before (a backbone
the native pass cannot take is logged once, with the reason, when the engine starts).

Exactness. The arithmetic is the lean forward's in float32, but sums (norms, dot products,
softmaxes) run in another order than torch's kernels, so hidden states may differ from the lean
forward's in the last bits, as the block products' already do; the tests hold greedy output to
the reference decoder's token for token, and compare the logits pass for pass within 1e-4.
The final norm and the head stay in torch (`LeanForward.logits`).
"""

from __future__ import annotations

import torch

from serving.engine import block_kernels
from serving.engine.lean_forward import LeanForward, Projection
from serving.engine.paged_attention import PagedKVStore, key_parts

FORMAT_CODES = {"q4_1": 0, "q8_0": 1}  # as decode_pass.cpp numbers them


def supports(lean: LeanForward, store: PagedKVStore) -> str | None:
    """None when the native pass can run this backbone's decode passes; else why not."""
    if store.keys[0].device.type != "cpu" or store.keys[0].dtype != torch.float32:
        return f"the cache holds {store.keys[0].dtype} on {store.keys[0].device}, not CPU float32"
    epsilons = set()
    for layer in lean.layers:
        if layer.act is not torch.nn.functional.silu:
            return "an MLP activation other than SiLU"
        for projection in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
            product = projection.product
            if product is None or product.block_weight is None:
                return "a weight product not held in a block format"
        for norm in (layer.input_norm, layer.post_norm):
            if norm.weight.dtype != torch.float32:
                return "a norm weight that is not float32"
            epsilons.add(float(norm.variance_epsilon))
    if len(epsilons) != 1:
        return "layer norms with different epsilons"
    if not block_kernels.available():  # (block weights exist only where the kernels built)
        return "the block kernels are not available (see the log)"
    return None


def _product_entries(projection: Projection) -> list[int]:
    """A product's row entries, as decode_pass.cpp reads them (pointers as integers)."""
    weight = projection.product.block_weight
    low = weight.low_rank
    bias = projection.bias
    return [
        FORMAT_CODES[weight.fmt],
        weight.blocks.data_ptr(),
        weight.out_features,
        weight.in_features,
        0 if low is None else low.a.data_ptr(),
        0 if low is None else low.a.shape[0],
        0 if low is None else low.tile_low.data_ptr(),
        0 if low is None else low.b.data_ptr(),
        0 if bias is None else bias.data_ptr(),
    ]


class NativeDecode:
    """hidden = NativeDecode(lean, store, mmca)(embeds, positions, new_slots, key_slots).

    Holds pointers into the model's block weights, norms and biases and into the store's
    tensors, and references to all of them, so they live as long as it does; the engine changes
    none of them while it serves."""

    def __init__(self, lean: LeanForward, store: PagedKVStore, mmca: bool) -> None:
        reason = supports(lean, store)
        if reason is not None:
            raise ValueError(f"the native decode pass cannot run this backbone: {reason}")
        self.lean = lean
        self.store = store
        self.mmca = mmca
        self.library = block_kernels.library()
        first = lean.layers[0]
        self.choice = first.qkv.layers[0].engine_linears.choice
        rows = []
        for layer in lean.layers:
            rows.append(
                [
                    layer.input_norm.weight.data_ptr(),
                    layer.post_norm.weight.data_ptr(),
                    store.keys[layer.index].data_ptr(),
                    store.values[layer.index].data_ptr(),
                ]
                + [
                    entry
                    for projection in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
                    for entry in _product_entries(projection)
                ]
            )
        self.table = torch.tensor(rows, dtype=torch.int64)  # (layers, entries)
        if self.table.shape[1] != self.library.vc_decode_layer_entries():
            raise RuntimeError("native_decode.py and decode_pass.cpp disagree on the table")
        intermediate = first.gate_up.product.block_weight.out_features // 2
        self.shape = torch.tensor(
            [
                first.input_norm.weight.shape[0],
                first.num_heads,
                first.num_kv_heads,
                first.head_dim,
                intermediate,
            ],
            dtype=torch.int64,
        )
        self.scalars = torch.tensor(
            [first.input_norm.variance_epsilon, first.scaling], dtype=torch.float32
        )

    def takes(self, rows: int) -> bool:
        """Whether a decode-only pass of `rows` rows runs here: the engine multiplies by the
        block kernels at that size (elsewhere the float32 kernels are faster)."""
        return self.choice.kernel_for(rows) == "blocks"

    def __call__(
        self,
        embeds: torch.Tensor,  # (m, hidden) float32, one new token per row
        positions: torch.Tensor,  # (m,) int64: each row's position p
        new_slots: torch.Tensor,  # (m,) int64: the cache slot of each row's new token
        key_slots: torch.Tensor,  # (m, k) int64: row r's positions 0..p at [r, :p + 1]
    ) -> torch.Tensor:
        """The rows' last hidden states (before the final norm): (m, hidden)."""
        m = embeds.shape[0]
        hidden = embeds.to(torch.float32, copy=True).contiguous()
        cos, sin = self.lean.rotary(hidden[None], positions[None])  # (1, m, head_dim) each
        cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        positions = positions.contiguous()
        new_slots = new_slots.contiguous()
        key_slots = key_slots.contiguous()
        if bool((key_slots.gather(1, positions[:, None]).squeeze(1) != new_slots).any()):
            raise ValueError("each row's last key slot must be its new slot")
        # Which softmax each key enters, the same in every layer: MMCA's rule, once per pass.
        parts = key_parts(self.store.tags[key_slots], positions, self.mmca)  # (m, k) uint8
        self.library.vc_decode_pass(
            hidden.data_ptr(),
            m,
            self.table.data_ptr(),
            self.table.shape[0],
            self.shape.data_ptr(),
            self.scalars.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            new_slots.data_ptr(),
            positions.data_ptr(),
            key_slots.data_ptr(),
            key_slots.shape[1],
            parts.data_ptr(),
        )
        return hidden
