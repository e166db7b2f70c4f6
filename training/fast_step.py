"""Cheaper training steps on CPU: the same arithmetic with less overhead around the matmuls.

On this repository's 2-core CPU (avx512_bf16 / AMX), one stage-1 micro-batch of the embedded
recipe (4 conversations of ~136 tokens, bf16 autocast, LoRA r 16 on every projection) spends
about 40% of its time in matmuls; the rest is casting the frozen float32 weights to bf16 on
every call (autocast does not cache casts of tensors that do not require grad), and hundreds of
small element-wise kernels per layer (norms, rotary, SiLU, residual adds, LoRA's extra paths).
Two switches, both off by default (`run.frozen_weights_bf16`, `run.compile`):

- :class:`FrozenBf16`: the language model's frozen linear weights are held in bf16 during
  training steps. Autocast casts them to bf16 for every matmul anyway, with the same rounding,
  so the loss and gradients are unchanged (tested); it only stops redoing the cast. The float32
  originals are kept and put back for evaluation and at the end of the stage, so nothing that
  reads the model outside a training step sees a difference. Weights tied to the input
  embeddings stay float32: the embedding lookup is not autocast, and a bf16 table would change
  the residual stream.
- :func:`compile_decoder_layers`: regional ``torch.compile`` of each decoder layer
  (``dynamic=True``, since sequence lengths change every micro-batch). The layers share their
  compiled graphs (a tiny 2-layer model compiles 2 graphs for 2 lengths, forward and
  backward), so the 30-layer LM compiles in 30-60 s once, not per layer. Evaluation runs eagerly
  (:func:`eager`): generation's shapes differ and would recompile.

`benchmarks/training_step.py --fast` measures both against the plain step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks of a transformers causal LM (peft-wrapped or not)."""
    for name, module in language_model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module):
            return module
    raise ValueError(f"no decoder layers found in {type(language_model).__name__}")


def compile_decoder_layers(language_model: nn.Module) -> int:
    """Compile every decoder layer in place; returns how many. Idempotent."""
    layers = decoder_layers(language_model)
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=True)
    return len(layers)


def uncompile_decoder_layers(language_model: nn.Module) -> None:
    """Undo :func:`compile_decoder_layers` (for a model handed on to generate with)."""
    for layer in decoder_layers(language_model):
        # nn.Module.compile stores the compiled call here; there is no public way back.
        layer._compiled_call_impl = None


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside the block (evaluation, generation)."""
    with torch.compiler.set_stance("force_eager"):
        yield


class FrozenBf16:
    """Holds the frozen linear weights of `language_model` in bf16 while applied."""

    def __init__(self, language_model: nn.Module) -> None:
        embeddings = language_model.get_input_embeddings()
        tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
        self.params = [
            module.weight
            for module in language_model.modules()
            if isinstance(module, nn.Linear)
            and not module.weight.requires_grad
            and module.weight.dtype == torch.float32
            and id(module.weight) not in tied
        ]
        self.originals: list[torch.Tensor] | None = None

    def apply(self) -> None:
        if self.originals is not None:
            return
        self.originals = [p.data for p in self.params]
        for p in self.params:
            p.data = p.data.to(torch.bfloat16)
        logger.info(
            "%d frozen linear weights held in bf16 (%.1fM parameters)",
            len(self.params),
            sum(p.numel() for p in self.params) / 1e6,
        )

    def restore(self) -> None:
        if self.originals is None:
            return
        for p, original in zip(self.params, self.originals, strict=True):
            p.data = original
        self.originals = None

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """The float32 originals inside the block, bf16 again after it (if applied before)."""
        was_applied = self.originals is not None
        self.restore()
        try:
            yield
        finally:
            if was_applied:
                self.apply()
