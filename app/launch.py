"""Serve the web chat: on its own (`launch_ui`, `visualchat ui`) or beside the OpenAI-compatible
API in one server (`mount_ui`, `serve_with_ui`, `visualchat serve --ui`)."""

from __future__ import annotations

import functools
import hmac
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
from fastapi import FastAPI

from app.chat import BackendUnavailable, ChatSettings, ReplyBackend
from app.ui import DEFAULT_TITLE, EXAMPLES_DIR, build_app
from serving.engine import Engine, EngineConfig, EngineLoop, RequestOutput
from visualchat.images import ImageLimits
from visualchat.messages import Conversation
from visualchat.sampling import SamplingParams

if TYPE_CHECKING:
    from serving.openai_api import APIServer

# Each streaming reply holds one of Gradio's worker threads while it waits for its next token
# (the sync generator's `next()` runs in a thread); Gradio's default of 40 would cap the number
# of simultaneous replies. Parked threads cost only memory.
MAX_THREADS = 512
UI_PATH = "/ui"


@dataclass
class RunningUI:
    """A web chat launched with `block=False` (tests, notebooks, scripts)."""

    blocks: gr.Blocks
    loop: EngineLoop
    url: str  # e.g. http://127.0.0.1:7860/

    def close(self) -> None:
        self.blocks.close()
        self.loop.shutdown()


def launch_ui(
    model_path: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    engine_config: EngineConfig | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    title: str = DEFAULT_TITLE,
    settings: ChatSettings | None = None,
    block: bool = True,
    quiet: bool = False,
) -> RunningUI:
    """Load the model (None: the embedded default) into an engine and serve the web chat.

    settings: the initial generation settings of the page. block: serve until Ctrl-C, then
    stop the engine; False returns at once with the running app (call `.close()` on it).
    """
    # Built on the loop's own thread: loading, probing and stepping share one OpenMP team.
    loop = EngineLoop.build(
        functools.partial(Engine.from_pretrained, model_path, engine_config, device, dtype)
    )
    try:
        demo = build_app(loop, title=title, settings=settings)
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            max_threads=MAX_THREADS,
            allowed_paths=[str(EXAMPLES_DIR)],
            footer_links=["api", "settings"],
            quiet=quiet,
        )
    except BaseException:
        loop.shutdown()
        raise
    running = RunningUI(demo, loop, url)
    if block:
        try:
            demo.block_thread()  # returns on Ctrl-C, after closing the server
        finally:
            loop.shutdown()
    return running


def mount_ui(
    fastapi_app: FastAPI,
    loop: ReplyBackend,
    path: str = UI_PATH,
    title: str = DEFAULT_TITLE,
    auth: Callable[[str, str], bool] | None = None,
    auth_message: str | None = None,
) -> gr.Blocks:
    """Mount the web chat on an existing FastAPI app (before its server starts) at `path`."""
    demo = build_app(loop, title=title)
    demo.max_threads = MAX_THREADS  # what launch(max_threads=) sets; mounting has no argument
    gr.mount_gradio_app(
        fastapi_app,
        demo,
        path=path,
        allowed_paths=[str(EXAMPLES_DIR)],
        footer_links=["api", "settings"],
        auth=auth,
        auth_message=auth_message,
    )
    return demo


class LeastBusyLoop:
    """A ReplyBackend over engine replicas that may still be loading (`visualchat serve --ui`
    loads them after the server starts): each reply goes to the loop with the fewest active
    requests; before any is loaded the chat says so instead of failing."""

    def __init__(self, loops: Callable[[], Sequence[EngineLoop]]) -> None:
        self._loops = loops

    def stream_outputs(
        self,
        conversation: Conversation,
        params: SamplingParams,
        limits: ImageLimits | None = None,
        request_id: str | None = None,
    ) -> Iterator[RequestOutput]:
        loops = list(self._loops())
        if not loops:
            raise BackendUnavailable("The model is still loading; send again in a moment.")
        loop = min(loops, key=lambda candidate: candidate.num_active)
        return loop.stream_outputs(conversation, params, limits, request_id)

    def abort(self, request_id: str) -> None:
        # Every loop hears it: the one that has the request aborts it, the others ignore the id.
        for loop in self._loops():
            loop.abort(request_id)


def serve_with_ui(
    model_path: str | os.PathLike | None = None, *, ui_path: str = UI_PATH, **server_args: Any
) -> None:
    """`serving.openai_api.serve` plus the web chat at `ui_path` on the same host and port, until
    interrupted. server_args: those of `serving.openai_api.APIServer`."""
    api_server_with_ui(model_path, ui_path=ui_path, **server_args).run()


def api_server_with_ui(
    model_path: str | os.PathLike | None = None, *, ui_path: str = UI_PATH, **server_args: Any
) -> APIServer:
    """An `APIServer` (not yet running) with the web chat mounted at `ui_path`. The server
    listens before the model is loaded; until then the chat answers that it is loading. With an
    API key, the web chat asks for it too (any user name, the key as the password)."""
    from serving.openai_api import APIServer

    server = APIServer(model_path, **server_args)
    api_key = server_args.get("api_key")
    auth = None
    if api_key:

        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())

    mount_ui(
        server.app,
        LeastBusyLoop(lambda: server.loops),
        path=ui_path,
        auth=auth,
        auth_message="Log in with any user name and the server's API key as the password.",
    )
    return server
