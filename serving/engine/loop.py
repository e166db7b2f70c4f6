"""EngineLoop: the engine's step loop on a background thread, for many concurrent callers.

Callers (HTTP handlers, Gradio sessions, ChatSessions) preprocess their conversation in their
own thread (image decoding and tokenization stay off the step loop), then hand the request to
the loop through an inbox; the loop thread owns the engine exclusively, so the engine needs no
locks. Each request's outputs come back on its own queue. Closing a stream early aborts the
request and frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from serving.engine.engine import Engine, RequestOutput
from visualchat.images import ImageLimits
from visualchat.messages import Conversation
from visualchat.processor import ProcessedInputs
from visualchat.sampling import SamplingParams

logger = logging.getLogger(__name__)


def read_outputs(sink: queue.Queue) -> Iterator[RequestOutput]:
    """A submitted request's outputs from its queue (`EngineLoop.submit`), up to and including
    the finished one; an error the loop put there is raised."""
    while True:
        item = sink.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finished:
            return


@dataclass
class _Submission:
    request_id: str
    inputs: ProcessedInputs
    params: SamplingParams
    sink: queue.Queue = field(default_factory=queue.Queue)  # RequestOutput | BaseException


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._start(self._run)

    @classmethod
    def build(cls, make_engine: Callable[[], Engine]) -> EngineLoop:
        """Start the loop thread, build the engine on it (model loading and the budget probe
        included) and return once it is ready; its error, if building fails.

        Why: on a CPU every thread that runs torch's parallel ops gets its own OpenMP team, and
        once libgomp manages more threads than there are cores it stops spinning between
        parallel regions, so each op waits for its worker to wake. A model loaded on one thread
        and stepped on another decodes ~25% slower on 2 cores (benchmarks/thread_penalty.py);
        built here, loading, probing and stepping share one team. Servers whose other threads
        do little torch work (request preprocessing of small images stays under torch's
        parallel grain) then run at the speed of a single-threaded program."""
        loop = cls.__new__(cls)
        built: queue.Queue = queue.Queue()  # None when ready, else the exception

        def build_then_run() -> None:
            try:
                loop.engine = make_engine()
            except BaseException as exc:  # handed to the caller below
                built.put(exc)
                return
            built.put(None)
            loop._run()

        loop._start(build_then_run)
        error = built.get()
        if error is not None:
            loop._stopped.set()
            raise error
        return loop

    def _start(self, target: Callable[[], None]) -> None:
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict[str, queue.Queue] = {}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._submit_lock = threading.Lock()  # a submission never slips past shutdown
        self._ids = itertools.count()
        self._thread = threading.Thread(target=target, name="visualchat-engine", daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------------

    def submit(
        self,
        conversation: Conversation | ProcessedInputs,
        params: SamplingParams,
        limits: ImageLimits | None = None,
        request_id: str | None = None,
    ) -> tuple[str, queue.Queue]:
        """Preprocess here (raises ImageError / ContextLengthError at once), then enqueue.

        request_id: the caller's own id, so that another thread can `abort` the request before
        this returns (the web chat's Stop); it must not be in use (the sink then gets a
        ValueError). Default: a fresh "loop-N"."""
        inputs = (
            conversation
            if isinstance(conversation, ProcessedInputs)
            else self.engine.process(conversation, limits)
        )
        submission = _Submission(request_id or f"loop-{next(self._ids)}", inputs, params)
        with self._submit_lock:
            if self._stopped.is_set():
                raise RuntimeError("the engine loop is stopped")
            self._inbox.put(("add", submission))
        self._wake.set()
        return submission.request_id, submission.sink

    def abort(self, request_id: str) -> None:
        """End a request from any thread: its stream gets a last output with finish_reason
        "abort". Unknown or finished ids are ignored, and so is an abort that reaches the loop
        before the request's submission does."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stream_outputs(
        self,
        conversation: Conversation | ProcessedInputs,
        params: SamplingParams,
        limits: ImageLimits | None = None,
        request_id: str | None = None,
    ) -> Iterator[RequestOutput]:
        """The request's outputs as they come (see `submit` for request_id); closing the stream
        before the finished output aborts the request."""
        request_id, sink = self.submit(conversation, params, limits, request_id)
        finished = False
        try:
            for item in read_outputs(sink):
                yield item
                finished = item.finished
        finally:
            if not finished:
                self.abort(request_id)

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        """Text deltas: the ChatSession backend protocol."""
        for out in self.stream_outputs(conversation, params):
            if out.delta:
                yield out.delta

    async def astream_outputs(
        self,
        conversation: Conversation | ProcessedInputs,
        params: SamplingParams,
        limits: ImageLimits | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Async variant for servers; cancelling the consumer aborts the request. Preprocessing
        (image decoding, tokenization) runs in a worker thread, off the event loop."""
        # One worker thread waits per active stream (servers size their pool for it).
        request_id, sink = await asyncio.to_thread(
            self.submit, conversation, params, limits, request_id
        )
        outputs = read_outputs(sink)  # each output is awaited in a worker thread
        finished = False
        try:
            while not finished:  # never asks past the finished output
                item = await asyncio.to_thread(next, outputs)
                yield item
                finished = item.finished
        finally:
            if not finished:
                self.abort(request_id)

    @property
    def num_active(self) -> int:
        """Requests submitted and not yet finished (for least-loaded routing; approximate: the
        inbox may also hold aborts)."""
        return len(self._sinks) + self._inbox.qsize()

    def shutdown(self) -> None:
        with self._submit_lock:
            self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- loop thread ----------------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(payload.inputs, payload.params, payload.request_id)
                    self._sinks[payload.request_id] = payload.sink
                except Exception as err:  # e.g. prompt over the cache: tell that caller only
                    payload.sink.put(err)
            elif self.engine.abort(payload):
                sink = self._sinks.pop(payload, None)
                if sink is not None:
                    sink.put(RequestOutput(payload, "", [], True, "abort", 0, 0))

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # a failed pass fails its requests, not the server
                logger.exception("engine step failed")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    sink = self._sinks.pop(request_id, None)
                    if sink is not None:
                        sink.put(err)
                continue
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink.put(out)
                    if out.finished:
                        self._sinks.pop(out.request_id, None)
        stopped = RuntimeError("the engine loop stopped")
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort(request_id)
            sink.put(stopped)
        self._sinks.clear()
        while True:  # submissions that reached the inbox but never the engine
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                payload.sink.put(stopped)


class EngineBackend:
    """ChatSession backend on a running EngineLoop: `vc_session = ChatSession(EngineBackend(l))`."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        return self.loop.stream(conversation, params)
