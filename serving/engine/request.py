"""One generation request as the engine tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from visualchat.detokenize import IncrementalDecoder
from visualchat.processor import ProcessedInputs
from visualchat.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (recomputed from scratch when readmitted)
    RUNNING = "running"  # holds cache blocks
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    inputs: ProcessedInputs  # prompt ids, modality tags, image spans, pixels, digests
    params: SamplingParams
    decoder: IncrementalDecoder
    generator: torch.Generator  # this request's private sampling stream
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # positions whose K/V are in the cache
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # cache block ids, in position order
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_preemptions: int = 0
    first_token_time: float | None = None
    image_features: torch.Tensor | None = None  # (num_images, tokens, hidden) once encoded

    @property
    def num_prompt_tokens(self) -> int:
        return self.inputs.num_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: every position this request will attend over."""
        return self.num_prompt_tokens + len(self.output_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Positions not yet in the cache (prompt chunks, or the last sampled token)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_id_at(self, position: int) -> int:
        if position < self.num_prompt_tokens:
            return int(self.inputs.input_ids[position])
        return self.output_ids[position - self.num_prompt_tokens]

    def modality_at(self, position: int) -> int:
        if position < self.num_prompt_tokens:
            return int(self.inputs.token_modality[position])
        return 0  # generated tokens are text
