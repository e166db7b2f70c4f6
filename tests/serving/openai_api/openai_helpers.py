"""Helpers of the OpenAI API tests: a real uvicorn server in a thread, image parts, idling."""

from __future__ import annotations

import base64
import copy
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from factories import make_image, png_bytes
from fastapi import FastAPI
from PIL import Image

from serving.engine import Engine, EngineConfig, EngineLoop
from visualchat.images import ImageLimits

API_KEY = "test-key"
MODEL_NAME = "tiny-visualchat"
ENGINE_CONFIG = EngineConfig(max_num_batched_tokens=64, num_blocks=256, block_size=8)
# Small limits so that over-limit images and bodies are cheap to send.
LIMITS = ImageLimits(
    max_bytes=32 * 1024,
    max_pixels=64 * 64,
    max_images=4,
    allow_remote=False,
    allow_local_files=False,
)
MAX_REQUEST_BYTES = 512 * 1024


class ServerThread:
    """uvicorn.Server over `app` on a socket bound here (so the port is known and free)."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


@dataclass
class Replica:
    engine: Engine
    loop: EngineLoop


def make_replica(model, tokenizer) -> Replica:
    engine = Engine(copy.deepcopy(model), tokenizer, ENGINE_CONFIG)
    return Replica(engine, EngineLoop(engine))


def wait_until_idle(engine: Engine, timeout: float = 15.0) -> None:
    """Poll until no request remains and every KV-cache block is free."""
    deadline = time.monotonic() + timeout
    while engine.requests or engine.blocks.num_free_blocks != engine.blocks.num_blocks:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"engine not idle after {timeout}s: {len(engine.requests)} requests, "
                f"{engine.blocks.num_free_blocks}/{engine.blocks.num_blocks} blocks free"
            )
        time.sleep(0.02)


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def image_part(image: Image.Image | None = None) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image or make_image())}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}
