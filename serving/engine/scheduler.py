"""Dynamic SplitFuse scheduling (DeepSpeed-FastGen) over a fixed token budget.

Design note. There is no prefill phase and decode phase: every forward pass is filled to the
same token budget. Running sequences that are decoding go first, one token each, so their
inter-token latency does not depend on what arrives; the rest of the budget goes to prompt
chunks in arrival order, and the last chunk is split so the pass is exactly full. Long prompts
are thus spread over several passes instead of stalling every stream for one huge pass, and
every pass has enough tokens to keep the hardware busy. With `chunked_prefill=False` the
scheduler behaves like a prefill-first engine (whole prompts, decodes paused while a prompt
runs) — the baseline that SplitFuse is compared against.

At most as many sequences run as the budget has tokens (and at most `max_num_seqs`), so every
running sequence's decode fits in every pass: with more, the decodes past the budget would wait
behind the earlier ones for as long as those run (a long reply starved behind 32 streams at a
budget of 32 did, in a benchmark), which vLLM rules out the same way (max_num_seqs <= its
token budget). A request beyond that waits for admission, in arrival order.

A prompt is admitted only when the cache can hold all of it, so an admitted prompt never waits
for blocks mid-prefill. When a decode needs a new block and none is free, the newest running
request is preempted (its blocks freed; it is recomputed from scratch when readmitted, first in
line). A request that could never fit the whole cache is refused at admission by the engine, so
the state "requests wait, nothing runs" cannot persist.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from serving.engine.config import EngineConfig
from serving.engine.kv_cache import BlockManager
from serving.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first position computed in this pass
    num_tokens: int  # positions computed in this pass

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's end, so its last position is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes first, then prompts
    preempted: list[Request] = field(default_factory=list)  # freed this step, back to waiting

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, budget: int) -> None:
        self.config = config
        self.blocks = blocks
        self.budget = budget
        self.max_running = min(config.max_num_seqs, budget)  # see the design note
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Free a request's blocks and forget it (finished or aborted)."""
        self.blocks.free(request.block_table)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        decoding = [r for r in self.running if r.num_pending_tokens == 1]
        if not self.config.chunked_prefill and self._admit_whole_prompts(out):
            return out  # prefill-first: decodes wait while whole prompts run
        budget = self.budget
        for request in decoding:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if not self._reserve(request, request.num_tokens, out):
                continue
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, 1))
            budget -= 1
        # Prompts already admitted (mid-prefill) arrived before anything still waiting.
        for request in self.running:
            if budget == 0:
                break
            if request.num_pending_tokens > 1 and request.status is RequestStatus.RUNNING:
                take = min(request.num_pending_tokens, budget)
                out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, take))
                budget -= take
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            if not self._admit(request):
                break  # keep arrival order: nothing overtakes the head of the queue
            take = min(request.num_pending_tokens, budget)
            out.chunks.append(ScheduledChunk(request, 0, take))
            budget -= take
        return out

    def _admit(self, request: Request) -> bool:
        """Move the head of the queue to running if the cache can hold its whole prompt."""
        if not self.blocks.grow(request.block_table, request.num_tokens):
            return False
        self.waiting.popleft()
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = 0
        self.running.append(request)
        return True

    def _admit_whole_prompts(self, out: SchedulerOutput) -> bool:
        budget = self.budget
        while self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            # At least one prompt per pass even if it alone exceeds the budget.
            if out.chunks and request.num_tokens > budget:
                break
            if not self._admit(request):
                break
            out.chunks.append(ScheduledChunk(request, 0, request.num_tokens))
            budget -= request.num_tokens
        return bool(out.chunks)

    def _reserve(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Make room for num_tokens positions, preempting the newest running requests."""
        while not self.blocks.grow(request.block_table, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        logger.info("preempting %s (cache full); it will be recomputed", request.request_id)
        self.blocks.free(request.block_table)
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)
        out.chunks = [c for c in out.chunks if c.request is not request]
