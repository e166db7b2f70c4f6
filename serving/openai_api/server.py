"""serve(): uvicorn at once (GET /health is 503 while loading), the model(s) loaded behind it.

Loading takes seconds to minutes (the embedded default dequantizes a GGUF file), so the server
listens first and loads in a background thread: orchestrators see a live process whose health
check turns 200 when it can answer. Each replica is an `Engine` on its own `EngineLoop` thread;
a `Router` sends each request to the least-loaded one.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from serving.engine import Engine, EngineConfig, EngineLoop
from serving.openai_api.app import DEFAULT_MAX_REQUEST_BYTES, create_app, set_backend
from serving.router import Router
from visualchat.images import ImageLimits

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "visualchat"  # the id /v1/models reports for the embedded default


def serve(
    model_path: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    replicas: int = 1,
    engine_config: EngineConfig | None = None,
    allow_remote_images: bool = False,
    model_name: str | None = None,
    device: str | Sequence[str] | None = None,
    dtype: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    default_max_tokens: int | None = None,
    log_level: str = "info",
) -> None:
    """Serve the OpenAI-compatible API until interrupted (Ctrl-C / SIGTERM).

    model_path: a VisualChat checkpoint folder; None for the embedded default.
    replicas: engine copies, each with its own KV cache and step thread.
    device: one device for every replica, or one per replica (["cuda:0", "cuda:1"]).
    model_name: the id in /v1/models and responses (default: the folder name).
    Raises RuntimeError if the model fails to load (the server stops then).
    """
    APIServer(
        model_path,
        host=host,
        port=port,
        api_key=api_key,
        replicas=replicas,
        engine_config=engine_config,
        allow_remote_images=allow_remote_images,
        model_name=model_name,
        device=device,
        dtype=dtype,
        max_request_bytes=max_request_bytes,
        default_max_tokens=default_max_tokens,
        log_level=log_level,
    ).run()


class APIServer:
    """`serve()` as an object, for embedding (notebooks, tests): `run()` blocks; `stop()` may be
    called from any thread."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        replicas: int = 1,
        engine_config: EngineConfig | None = None,
        allow_remote_images: bool = False,
        model_name: str | None = None,
        device: str | Sequence[str] | None = None,
        dtype: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        default_max_tokens: int | None = None,
        log_level: str = "info",
    ) -> None:
        import uvicorn

        self.model_path = model_path
        self.devices = _replica_devices(device, replicas)
        self.engine_config = engine_config or EngineConfig()
        self.dtype = dtype
        self.limits = ImageLimits(allow_remote=allow_remote_images, allow_local_files=False)
        self.model_name = model_name or (
            Path(model_path).name if model_path is not None else DEFAULT_MODEL_NAME
        )
        self.app = create_app(
            None,
            self.model_name,
            api_key=api_key,
            limits=self.limits,
            max_request_bytes=max_request_bytes,
            default_max_tokens=default_max_tokens,
        )
        self.loops: list[EngineLoop] = []  # one per loaded replica
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10
            )
        )
        self._load_error: BaseException | None = None

    @property
    def is_ready(self) -> bool:
        return self.app.state.visualchat.is_ready

    def run(self) -> None:
        """Listen at once, load the replicas in the background, serve until stopped."""
        loader = threading.Thread(target=self._load, name="visualchat-load", daemon=True)
        loader.start()
        try:
            self._server.run()
        finally:
            for loop in self.loops:
                loop.shutdown()
        if self._load_error is not None:
            raise RuntimeError(f"loading the model failed: {self._load_error}") from (
                self._load_error
            )

    def stop(self) -> None:
        self._server.should_exit = True

    def _engine(self, device: str | None) -> Engine:
        return Engine.from_pretrained(
            self.model_path, self.engine_config, device, self.dtype, self.limits
        )

    def _load(self) -> None:
        try:
            for index, device in enumerate(self.devices):
                logger.info("loading replica %d/%d on %s", index + 1, len(self.devices), device)
                # Built on its own loop thread: loading, probing and stepping share one
                # OpenMP team (EngineLoop.build says why).
                self.loops.append(EngineLoop.build(functools.partial(self._engine, device)))
            set_backend(self.app, Router(self.loops))
            logger.info("%s ready (%d replica(s))", self.model_name, len(self.loops))
        except BaseException as exc:  # reported through /health, then by run()
            logger.exception("loading the model failed")
            self._load_error = exc
            self.app.state.visualchat.load_error = f"{type(exc).__name__}: {exc}"
            self.stop()


def _replica_devices(device: str | Sequence[str] | None, replicas: int) -> list[str | None]:
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if device is None or isinstance(device, str):
        return [device] * replicas
    if len(device) != replicas:
        raise ValueError(f"{len(device)} devices given for {replicas} replicas; give one each")
    return list(device)
