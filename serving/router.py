"""Router: several engine replicas behind one `astream_outputs`, least-loaded first.

Like DeepSpeed-MII's load balancer, each request goes to one replica for its whole life (its KV
cache lives there). The replica is the one with the fewest active requests; ties go round robin,
so an idle pool still spreads requests. A request counts against its replica from the moment it
is routed: while its images are decoded and its prompt tokenized (off the event loop) it is
"pending" here, and from submission on the replica's own `num_active` counts it, so a burst of
arrivals spreads out instead of all picking the replica that looked idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from serving.engine import EngineLoop, RequestOutput
from visualchat.images import ImageLimits
from visualchat.messages import Conversation
from visualchat.processor import ProcessedInputs
from visualchat.sampling import SamplingParams

logger = logging.getLogger(__name__)


class Router:
    """Use from one event loop (the routing counters are not locked)."""

    def __init__(self, loops: Sequence[EngineLoop]) -> None:
        if not loops:
            raise ValueError("Router needs at least one engine loop")
        self.loops = list(loops)
        self._num_pending = [0] * len(self.loops)  # routed, still being preprocessed
        self._next = 0  # round-robin cursor among equally loaded replicas

    @property
    def num_active(self) -> int:
        return sum(self.loads())

    def loads(self) -> list[int]:
        return [
            loop.num_active + pending
            for loop, pending in zip(self.loops, self._num_pending, strict=True)
        ]

    def pick(self) -> int:
        """Index of the least-loaded replica; among equals the first at or after the cursor."""
        loads = self.loads()
        least = min(loads)
        num_loops = len(self.loops)
        for offset in range(num_loops):
            index = (self._next + offset) % num_loops
            if loads[index] == least:
                self._next = (index + 1) % num_loops
                return index
        raise AssertionError("unreachable: some replica has the least load")

    async def astream_outputs(
        self,
        conversation: Conversation | ProcessedInputs,
        params: SamplingParams,
        limits: ImageLimits | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Route, preprocess in a worker thread (image decoding and tokenization must not block
        the event loop), then stream the replica's outputs. Closing the stream aborts."""
        index = self.pick()
        loop = self.loops[index]
        self._num_pending[index] += 1
        try:
            if not isinstance(conversation, ProcessedInputs):
                conversation = await asyncio.to_thread(loop.engine.process, conversation, limits)
        finally:
            self._num_pending[index] -= 1
        # No await between here and the replica's submit (the first step of its stream), so no
        # other request can see this one counted nowhere.
        async with aclosing(loop.astream_outputs(conversation, params)) as outputs:
            async for out in outputs:
                yield out

    def shutdown(self) -> None:
        for loop in self.loops:
            loop.shutdown()
