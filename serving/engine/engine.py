"""Engine: add requests, step the scheduler and runner, stream text deltas out."""

from __future__ import annotations

import itertools
import logging
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from serving.engine.config import EngineConfig
from serving.engine.kv_cache import BlockManager
from serving.engine.request import Request, RequestStatus
from serving.engine.runner import ModelRunner
from serving.engine.scheduler import ScheduledChunk, Scheduler
from visualchat.api import ImageFeatureCache
from visualchat.detokenize import IncrementalDecoder
from visualchat.images import ImageLimits
from visualchat.messages import Conversation
from visualchat.model.generate import GenerationOutput, max_context, stop_token_ids
from visualchat.model.modeling import VisualChatModel
from visualchat.processor import ContextLengthError, ProcessedInputs, VisualChatProcessor
from visualchat.sampling import SamplingParams, make_generator, sample_next_token

logger = logging.getLogger(__name__)

BUDGET_CANDIDATES = (32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class RequestOutput:
    request_id: str
    delta: str  # text newly safe to show
    new_token_ids: list[int]  # tokens generated in this step
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished
    num_prompt_tokens: int
    num_output_tokens: int


class Engine:
    def __init__(
        self,
        model: VisualChatModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig | None = None,
        limits: ImageLimits | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.context_length = max_context(model)
        self.processor = VisualChatProcessor.for_model(
            model, tokenizer, max_length=self.context_length, limits=limits
        )
        self.blocks = BlockManager(self.config.resolved_num_blocks, self.config.block_size)
        self.runner = ModelRunner(
            model,
            self.blocks,
            self.config.linear_kernels,
            self.config.lean_forward,
            self.config.decode_mirror_tokens,
            self.config.block_kernels,
            self.config.native_decode,
            self.config.native_attention,
        )
        self.image_cache = ImageFeatureCache(self.config.image_cache_entries)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        budget = self.config.max_num_batched_tokens or self._pick_budget()
        self.scheduler = Scheduler(self.config, self.blocks, budget)
        self.num_steps = 0
        logger.info(
            "engine ready: budget %d tokens/pass, at most %d sequences at once, cache %d blocks"
            " x %d (%.0f MB)",
            budget,
            self.scheduler.max_running,
            self.blocks.num_blocks,
            self.blocks.block_size,
            self.runner.store.num_bytes / 2**20,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        config: EngineConfig | None = None,
        device: str | None = None,
        dtype: str | None = None,
        limits: ImageLimits | None = None,
    ) -> Engine:
        from visualchat.model import loading

        options = loading.LoadOptions(device=device, dtype=dtype)
        if path is None:
            model, tokenizer = loading.load_embedded_default(options)
        else:
            model, tokenizer = loading.load_pretrained(path, options)
        return cls(model, tokenizer, config, limits)

    def close(self) -> None:
        """Abort what is left and hand the model back with its own attention (the engine
        switched its backbone to paged attention), so it can be used outside the engine again."""
        for request_id in list(self.requests):
            self.abort(request_id)
        self.runner.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def budget(self) -> int:
        return self.scheduler.budget

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # -- requests ---------------------------------------------------------------------------

    def process(
        self, conversation: Conversation, limits: ImageLimits | None = None
    ) -> ProcessedInputs:
        """Decode, check and tokenize a conversation (callers do this off the step loop)."""
        return self.processor(conversation, add_generation_prompt=True, limits=limits)

    def add_request(
        self,
        prompt: Conversation | ProcessedInputs,
        params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        inputs = prompt if isinstance(prompt, ProcessedInputs) else self.process(prompt)
        limit = min(self.context_length, self.capacity_tokens)
        if inputs.num_tokens >= limit:
            raise ContextLengthError(
                f"the prompt is {inputs.num_tokens} tokens but at most {limit - 1} fit "
                f"(model context {self.context_length}, cache {self.capacity_tokens} tokens)"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(
            request_id=request_id,
            inputs=inputs,
            params=params,
            decoder=IncrementalDecoder(self.tokenizer, params.stop),
            generator=make_generator(params),
        )
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its cache blocks; False if it is unknown or finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        request.finish_reason = "abort"
        self.scheduler.finish(request)
        self._hold_nothing_when_idle()  # the loop steps no idle engine: clear here, not there
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- stepping ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("requests wait but nothing runs: the scheduler is stuck")
            return []
        for chunk in plan.chunks:
            self.runner.ensure_image_features(chunk.request, self._encode)
        logits = self.runner.execute(plan.chunks)  # (num_sampling_chunks, vocab)
        self.num_steps += 1
        outputs = []
        sampling = [c for c in plan.chunks if c.samples]
        for chunk in plan.chunks:
            chunk.request.num_computed_tokens = chunk.start + chunk.num_tokens
        # Greedy rows take their tokens from one argmax over the whole batch (half the time of
        # one per row with 16 rows; the same first-maximum rule, so the same tokens).
        greedy = (
            logits.argmax(dim=-1).tolist()
            if any(c.request.params.is_greedy for c in sampling)
            else None
        )
        for row, chunk in enumerate(sampling):
            token_id = (
                greedy[row]
                if chunk.request.params.is_greedy
                else sample_next_token(logits[row], chunk.request.params, chunk.request.generator)
            )
            outputs.append(self._on_token(chunk, token_id))
        self._hold_nothing_when_idle()
        return outputs

    def _hold_nothing_when_idle(self) -> None:
        if not self.scheduler.has_work:
            self.runner.mirror.clear()  # no copies of finished sequences' keys

    def _encode(self, request: Request) -> torch.Tensor | None:
        return self.image_cache.features(self.model, request.inputs)

    def _on_token(self, chunk: ScheduledChunk, token_id: int) -> RequestOutput:
        request = chunk.request
        params = request.params
        request.output_ids.append(token_id)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        finish = None
        delta = ""
        if token_id in self.stop_ids and not params.ignore_eos:
            finish = "stop"
        else:
            delta = request.decoder.add(token_id)
            if request.decoder.is_stopped:
                finish = "stop"
            elif len(request.output_ids) >= params.max_tokens or request.num_tokens >= min(
                self.context_length, self.capacity_tokens
            ):
                finish = "length"
        if finish is not None:
            delta += request.decoder.flush()
            request.finish_reason = finish
            self.scheduler.finish(request)
            self.requests.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            delta=delta,
            new_token_ids=[token_id],
            finished=finish is not None,
            finish_reason=finish,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_ids),
        )

    # -- conveniences -----------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Conversation | ProcessedInputs], params: SamplingParams
    ) -> list[GenerationOutput]:
        """Run prompts to completion together (continuous batching); outputs in input order."""
        ids = [self.add_request(p, params) for p in prompts]
        results = {i: GenerationOutput(text="") for i in ids}
        for request_id in ids:
            results[request_id].num_prompt_tokens = self.requests[request_id].num_prompt_tokens
        while self.has_unfinished_requests():
            for out in self.step():
                result = results.get(out.request_id)
                if result is None:
                    continue
                result.text += out.delta
                result.token_ids += out.new_token_ids
                if out.finished:
                    result.finish_reason = out.finish_reason
        return [results[i] for i in ids]

    def generate_batch(
        self, prompts: Sequence[Conversation | ProcessedInputs], params: SamplingParams
    ) -> list[GenerationOutput]:
        """`generate` under the name batch consumers (training.evaluate) look for."""
        return self.generate(prompts, params)

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        """Single-caller streaming (ChatSession backend without a background loop)."""
        request_id = self.add_request(conversation, params)
        try:
            while request_id in self.requests:
                for out in self.step():
                    if out.request_id == request_id and out.delta:
                        yield out.delta
        finally:
            self.abort(request_id)

    def _pick_budget(self) -> int:
        """Largest candidate budget whose forward pass stays under the latency target, timed on
        this machine with a throwaway prompt chunk after `probe_context` cached tokens (FastGen
        picks its budget by timing passes the same way)."""
        target = self.config.target_step_ms / 1000
        best = self.config.min_budget
        for budget in BUDGET_CANDIDATES:
            if not self.config.min_budget <= budget <= self.config.max_budget:
                continue
            if budget >= min(self.context_length, self.capacity_tokens):
                break
            seconds = self._time_pass(budget)
            logger.info("budget %d tokens: %.0f ms per pass", budget, seconds * 1000)
            if seconds > target:
                break
            best = budget
        return best

    def _time_pass(self, num_tokens: int, repeats: int = 2) -> float:
        # The chunk's keys before it are whatever the cache slots hold: only the time counts.
        prefix = min(
            self.config.probe_context,
            self.context_length - num_tokens,
            self.capacity_tokens - num_tokens,
        )
        total = prefix + num_tokens
        inputs = ProcessedInputs(
            input_ids=torch.full((total,), 1, dtype=torch.long),
            token_modality=torch.zeros(total, dtype=torch.long),
            image_spans=[],
            pixel_values=None,
        )
        request = Request(
            "budget-probe",
            inputs,
            SamplingParams(),
            IncrementalDecoder(self.tokenizer),
            torch.Generator(),
        )
        timings = []
        if not self.blocks.grow(request.block_table, total):
            return float("inf")
        try:
            for _ in range(repeats):
                started = time.perf_counter()
                self.runner.execute([ScheduledChunk(request, prefix, num_tokens)])
                timings.append(time.perf_counter() - started)
        finally:
            self.blocks.free(request.block_table)
        return statistics.median(timings)


__all__ = ["Engine", "RequestOutput", "RequestStatus"]
