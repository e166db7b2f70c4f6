"""The OpenAI-compatible FastAPI app: `/health`, `/v1/models`, `/v1/chat/completions`.

The app never touches tensors: it parses the request, builds a Conversation and SamplingParams,
and streams `RequestOutput`s from a backend (an `EngineLoop`, or a `Router` over several). A bare
EngineLoop is wrapped in a one-replica Router, whose stream decodes images and tokenizes in a
worker thread, so one large image never stalls the event loop for other clients.

Disconnects. A request whose client goes away is aborted, which frees its KV-cache blocks: while
waiting for the first token (and for the whole of a non-streamed reply) a watcher task races
the generation against the ASGI `http.disconnect` message and cancels it; while streaming,
Starlette's StreamingResponse cancels the body iterator on disconnect, and the iterator also
checks `request.is_disconnected()` between chunks. Cancellation reaches the backend's async
generator, whose `finally` aborts the engine request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import EngineLoop, RequestOutput
from serving.openai_api.errors import APIError
from serving.openai_api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    completion_id,
    now,
)
from serving.router import Router
from visualchat.images import ImageLimits
from visualchat.messages import Conversation
from visualchat.sampling import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20  # a few large base64 images
PARSE_IN_THREAD_BYTES = 2**20  # bodies this large are parsed off the event loop (images)
# EngineLoop.astream_outputs parks one worker thread per active stream while it waits for the
# next token (asyncio.to_thread over a queue.Queue); the event loop's default pool would be
# min(32, cores + 4) threads, which many concurrent streams exhaust, queueing every other thread
# hop (image decoding included) behind them. Parked threads cost only memory.
DEFAULT_MAX_THREADS = 512
# Clients may send inline (data URL) images only, unless the server says otherwise.
NETWORK_LIMITS = ImageLimits(allow_remote=False, allow_local_files=False)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Backend(Protocol):
    def astream_outputs(
        self, conversation: Conversation, params: SamplingParams, limits: ImageLimits | None
    ) -> AsyncGenerator[RequestOutput, None]: ...  # closing it aborts the request

    @property
    def num_active(self) -> int: ...


class ServerState:
    """What the handlers share: the backend once it is loaded (None while loading)."""

    def __init__(self, backend: Backend | EngineLoop | None) -> None:
        self.backend: Backend | None = None
        self.load_error: str | None = None  # set when loading failed; /health says so
        if backend is not None:
            self.set_backend(backend)

    @property
    def is_ready(self) -> bool:
        return self.backend is not None

    def set_backend(self, backend: Backend | EngineLoop) -> None:
        self.backend = Router([backend]) if isinstance(backend, EngineLoop) else backend

    def require_backend(self) -> Backend:
        if self.backend is None:
            message = (
                f"the model failed to load: {self.load_error}"
                if self.load_error
                else "the model is still loading; retry when GET /health returns 200"
            )
            raise APIError(503, message, code="model_not_ready")
        return self.backend


def set_backend(app: FastAPI, backend: Backend | EngineLoop) -> None:
    """Make a created-while-loading app ready: /health turns 200, completions are served."""
    app.state.visualchat.set_backend(backend)


def create_app(
    backend: Backend | EngineLoop | None,
    model_name: str,
    api_key: str | None = None,
    limits: ImageLimits = NETWORK_LIMITS,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    default_max_tokens: int | None = None,
    max_threads: int = DEFAULT_MAX_THREADS,
) -> FastAPI:
    """The HTTP app over `backend` (None: loading; call `set_backend(app, backend)` later).

    limits: what images clients may send; remote URLs and local files are refused by default.
    max_request_bytes: larger bodies get a 413 before they are read to the end.
    default_max_tokens: for requests without max_tokens (None: SamplingParams' default).
    max_threads: the server's worker-thread pool (preprocessing, and one parked thread per
    active stream inside EngineLoop.astream_outputs).
    """
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
    if limits.allow_local_files:
        logger.warning("local image files are allowed: clients can make the server read files")
    state = ServerState(backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="visualchat-http")
        )
        yield

    app = FastAPI(title="VisualChat OpenAI-compatible API", lifespan=lifespan)
    app.state.visualchat = state

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "missing API key: send it as 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body.model_dump(), status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body.model_dump(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.is_ready:
            return JSONResponse({"status": "ok"})
        if state.load_error is not None:
            return JSONResponse({"status": "error", "message": state.load_error}, 503)
        return JSONResponse({"status": "loading"}, 503)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        check_api_key(request)
        return ModelList(data=[ModelCard(id=model_name)])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        check_api_key(request)
        backend = state.require_backend()
        body = await _read_body(request, max_request_bytes)
        try:
            chat = (
                ChatCompletionRequest.model_validate_json(body)
                if len(body) < PARSE_IN_THREAD_BYTES
                else await asyncio.to_thread(ChatCompletionRequest.model_validate_json, body)
            )
        except ValidationError as exc:
            raise APIError.from_validation(exc) from None
        if chat.model is not None and chat.model != model_name:
            raise APIError(
                404,
                f"the model {chat.model!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        if chat.n not in (None, 1):
            raise APIError(400, f"n must be 1 (one choice per request), got {chat.n}", "n")
        try:
            conversation = Conversation.from_openai(chat.openai_messages())
            params = _sampling_params(chat, default_max_tokens)
        except ValueError as exc:
            raise APIError.from_value_error(exc) from None
        if not conversation.messages:
            raise APIError(400, "messages must not be empty", param="messages")

        outputs = backend.astream_outputs(conversation, params, limits)
        try:
            # The first output comes after the prompt was processed and admitted: bad images
            # and over-long prompts are still 4xx responses, not errors inside a 200 stream.
            first = await _unless_disconnected(request, _first(outputs))
            if chat.stream:
                include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
                events = _sse_events(request, first, outputs, model_name, include_usage)
                return StreamingResponse(
                    events, media_type="text/event-stream", headers=SSE_HEADERS
                )
            return await _unless_disconnected(request, _completion(first, outputs, model_name))
        except _ClientGone:
            await outputs.aclose()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except Exception as exc:
            await outputs.aclose()
            error = _as_api_error(exc)
            if error is exc:
                raise
            raise error from exc
        except BaseException:  # cancelled (server shutdown): still abort the engine request
            await outputs.aclose()
            raise

    return app


# --- request --------------------------------------------------------------------------------------


async def _read_body(request: Request, max_bytes: int) -> bytes:
    too_large = APIError(
        413,
        f"the request body is larger than {max_bytes} bytes; send smaller or fewer images",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _sampling_params(chat: ChatCompletionRequest, default_max_tokens: int | None) -> SamplingParams:
    """Raises ValueError (SamplingParams' own message) for out-of-range values."""
    knobs: dict[str, Any] = {
        "temperature": 1.0 if chat.temperature is None else chat.temperature,
        "ignore_eos": chat.ignore_eos,
        "seed": chat.seed,
    }
    max_tokens = next(
        (n for n in (chat.max_completion_tokens, chat.max_tokens) if n is not None),
        default_max_tokens,
    )
    if max_tokens is not None:
        knobs["max_tokens"] = max_tokens
    if chat.top_p is not None:
        knobs["top_p"] = chat.top_p
    if chat.top_k is not None:
        knobs["top_k"] = chat.top_k
    if chat.stop is not None:
        knobs["stop"] = (chat.stop,) if isinstance(chat.stop, str) else tuple(chat.stop)
    return SamplingParams(**knobs)


# --- generation -----------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client disconnected before the response started."""


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine request) if the client leaves."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            # Wait for the cancellation to unwind the backend's stream (its finally aborts).
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise _ClientGone
    return work_task.result()


async def _first(outputs: AsyncGenerator[RequestOutput, None]) -> RequestOutput:
    return await anext(outputs)


async def _completion(
    first: RequestOutput, outputs: AsyncGenerator[RequestOutput, None], model_name: str
) -> JSONResponse:
    text = [first.delta]
    last = first
    while not last.finished:
        last = await anext(outputs)
        text.append(last.delta)
    completion = ChatCompletion(
        id=completion_id(),
        created=now(),
        model=model_name,
        choices=[
            Choice(
                message=AssistantMessage(content="".join(text)),
                finish_reason=_finish_reason(last),
            )
        ],
        usage=Usage.of(last.num_prompt_tokens, last.num_output_tokens),
    )
    return JSONResponse(completion.model_dump())


async def _sse_events(
    request: Request,
    first: RequestOutput,
    outputs: AsyncGenerator[RequestOutput, None],
    model_name: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """`data: {chunk}` events: the role, content deltas, the finish reason, maybe the usage,
    then `data: [DONE]`. Closing this iterator (on disconnect) closes `outputs`: an abort."""
    chunk_id, created = completion_id(), now()

    def event(delta: Delta, finish: str | None = None, usage: Usage | None = None) -> str:
        choices = [] if usage is not None else [ChunkChoice(delta=delta, finish_reason=finish)]
        chunk = ChatCompletionChunk(
            id=chunk_id, created=created, model=model_name, choices=choices, usage=usage
        )
        # As OpenAI: "usage" is null on every chunk but the last when usage was asked for, and
        # absent otherwise; "finish_reason" is always present.
        payload = chunk.model_dump(mode="json", exclude={"usage"} if not include_usage else None)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async with aclosing(outputs):
        yield event(Delta(role="assistant", content=""))
        out = first
        while True:
            if out.delta:
                yield event(Delta(content=out.delta))
            if out.finished:
                break
            if await request.is_disconnected():
                return
            try:
                out = await anext(outputs)
            except Exception as exc:  # the engine failed mid-stream: tell the client in-band
                logger.exception("stream failed")
                yield f"data: {_as_api_error(exc).body.model_dump_json()}\n\n"
                yield "data: [DONE]\n\n"
                return
        try:
            finish_reason = _finish_reason(out)
        except APIError as exc:
            yield f"data: {exc.body.model_dump_json()}\n\n"
        else:
            yield event(Delta(), finish_reason)
            if include_usage:
                yield event(Delta(), usage=Usage.of(out.num_prompt_tokens, out.num_output_tokens))
        yield "data: [DONE]\n\n"


def _finish_reason(out: RequestOutput) -> str:
    if out.finish_reason in ("stop", "length"):
        return out.finish_reason
    # "abort" reaches a reader only when the engine dropped the request itself.
    raise APIError(503, f"the request was aborted by the server ({out.finish_reason})")


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return APIError.from_value_error(exc)
    if isinstance(exc, RuntimeError) and "stopped" in str(exc):
        return APIError(503, f"the server is shutting down ({exc})")
    logger.error("chat completion failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


__all__ = ["Backend", "ServerState", "create_app", "set_backend"]
