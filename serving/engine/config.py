"""Engine configuration (per-request knobs live in visualchat.sampling.SamplingParams)."""

from __future__ import annotations

from dataclasses import dataclass

from serving.engine.linear_kernels import KERNELS


@dataclass
class EngineConfig:
    max_num_batched_tokens: int | None = None  # token budget per forward; None: from latency
    # Latency target used to pick the budget at start-up: the largest candidate whose timed pass
    # fits. 250 ms picks 64 on the 2-core CPU, the shortest fused passes (inter-token latency is
    # what the target is for); 400 ms would pick 128, where long prompts beside 32 streams got
    # their first token about 3x sooner and every request met the bench's SLA, the median gap
    # ~0.06 s longer (README, "Serving engine": what the budget trades). `--budget` sets it.
    target_step_ms: float = 250.0
    # The timed pass attends over this many cached tokens before its chunk (capped by the
    # context and the cache), as a chunk deep in a long prompt does; on the 2-core CPU a
    # 128-token chunk took ~0.4 s there and under 0.25 s at a prompt's start.
    probe_context: int = 1024
    min_budget: int = 32  # never pick a budget below this (keeps prefill moving)
    max_budget: int = 2048  # never pick a budget above this
    chunked_prefill: bool = True  # Dynamic SplitFuse; False: whole prompts first, for comparison
    block_size: int = 16  # tokens per KV-cache block
    num_blocks: int | None = None  # cache size; None: max_cache_tokens / block_size
    max_cache_tokens: int = 16384  # default cache capacity in tokens (all sequences together)
    max_num_seqs: int = 64  # running sequences at most (decode batch size; the budget caps it too)
    image_cache_entries: int = 256  # distinct images whose features are kept
    # CPU only: the backbone's float32 linear layers run the engine's kernels
    # (serving/engine/linear_kernels.py): "auto" times them at start-up and takes the faster
    # for each pass size; "linear" or "rows" uses one for every size; None leaves torch's own
    # layers alone.
    linear_kernels: str | None = "auto"
    # Weights that are exactly a llama.cpp block format (a GGUF model's Q4_1 and Q8_0 tensors,
    # as the embedded default's are) are also kept as those blocks, and "auto" times the block
    # kernels (serving/engine/block_kernels.py) with the others. False: float32 weights only.
    block_kernels: bool = True
    # Decode-only passes that the block kernels multiply run every layer in one native call
    # (serving/engine/native_decode.py). False: the lean forward for them too, for comparison.
    native_decode: bool = True
    # The decode rows of other passes (more rows than the native pass takes, or beside a prompt
    # chunk) attend in native code straight from their cache slots, instead of gathering every
    # sequence's keys into a batch padded to the longest context (paged_attention.py). CPU
    # float32 caches only. False: the gather (or the decode mirror) and SDPA, for comparison.
    native_attention: bool = True
    # Llama-family backbones (serving/engine/lean_forward.py) run the engine's own flat forward
    # instead of transformers' modules: the same arithmetic without their per-call overhead.
    # False: transformers' forward for every backbone, for comparison.
    lean_forward: bool = True
    # Decode steps keep the running sequences' keys and values gathered from the paged cache
    # between steps and append each step's new ones (serving/engine/decode_mirror.py), for
    # groups of up to this many positions (sequences x (longest context + 32)); 0: gather in
    # every layer of every step. The memory is that many positions of keys and values in
    # every layer, half what the default cache (max_cache_tokens) holds: 377 MB for the
    # embedded default, 2.1 GB for a float32 Mistral-7B (32 layers, 8 kv heads of 128).
    decode_mirror_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2, got {self.num_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if not 0 < self.min_budget <= self.max_budget:
            raise ValueError("need 0 < min_budget <= max_budget")
        if self.probe_context < 0:
            raise ValueError(f"probe_context must be non-negative, got {self.probe_context}")
        if self.linear_kernels not in (None, "auto", *KERNELS):
            raise ValueError(
                f"linear_kernels must be None, 'auto' or one of {KERNELS}, "
                f"got {self.linear_kernels!r}"
            )
        if self.decode_mirror_tokens < 0:
            raise ValueError(
                f"decode_mirror_tokens must be non-negative, got {self.decode_mirror_tokens}"
            )
        if self.target_step_ms <= 0:
            raise ValueError(f"target_step_ms must be positive, got {self.target_step_ms}")

    @property
    def resolved_num_blocks(self) -> int:
        return self.num_blocks or max(2, self.max_cache_tokens // self.block_size)
