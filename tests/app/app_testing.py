"""Helpers for the web chat tests: a tiny model's engine loop (optionally slowed down and made
to ignore end-of-sequence, so a reply lasts long enough to stop), its reference decoder, image
files, and waiting for the engine to go idle."""

from __future__ import annotations

import copy
import functools
import itertools
import socket
import time
from collections.abc import Callable
from pathlib import Path

from factories import BLUE, GREEN, RED, YELLOW, make_image, make_model

from serving.engine import Engine, EngineConfig, EngineLoop
from visualchat.api import VisualChat

# Seed 3 gives varied greedy output (few repeated tokens), as in the engine tests.
MODEL_SEED = 3
ENGINE_CONFIG = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 64}
COLORS = {"red": RED, "green": GREEN, "blue": BLUE, "yellow": YELLOW}


@functools.lru_cache(maxsize=1)
def tiny_model():
    """(model, tokenizer), built once; engines and references get their own copies."""
    return make_model(seed=MODEL_SEED)


def make_loop(step_delay: float = 0.0, ignore_eos: bool = False, **config) -> EngineLoop:
    """An EngineLoop over a private copy of the tiny model. step_delay: seconds added before
    every forward pass; ignore_eos: replies run to max_tokens (long replies to stop); config:
    EngineConfig fields over the small defaults."""
    model, tokenizer = tiny_model()
    engine = Engine(copy.deepcopy(model), tokenizer, EngineConfig(**{**ENGINE_CONFIG, **config}))
    slow_down(engine, step_delay, ignore_eos)
    return EngineLoop(engine)


def slow_down(engine: Engine, step_delay: float, ignore_eos: bool = False) -> Callable[[], None]:
    """Make each engine step take step_delay longer (and never stop at EOS); returns undo."""
    step, stop_ids = engine.step, engine.stop_ids
    if step_delay > 0:

        def slow_step():
            time.sleep(step_delay)
            return step()

        engine.step = slow_step
    if ignore_eos:
        engine.stop_ids = set()

    def restore() -> None:
        engine.step, engine.stop_ids = step, stop_ids

    return restore


def reference() -> VisualChat:
    """The reference decoder on its own copy of the tiny model."""
    model, tokenizer = tiny_model()
    return VisualChat(copy.deepcopy(model), tokenizer)


def image_files(folder: Path) -> dict[str, str]:
    """PNG files red.png, green.png, blue.png, yellow.png in folder: name -> path."""
    paths = {}
    for name, color in COLORS.items():
        path = folder / f"{name}.png"
        make_image(color).save(path)
        paths[name] = str(path)
    return paths


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def is_idle(loop: EngineLoop) -> bool:
    """No request anywhere and every KV-cache block free."""
    engine = loop.engine
    return (
        not engine.requests
        and engine.blocks.num_used_blocks == 0
        and not engine.scheduler.running
        and not engine.scheduler.waiting
        and loop.num_active == 0
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_growing(texts: list[str]) -> bool:
    """Each streamed text extends the one before it."""
    return all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
