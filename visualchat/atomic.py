"""Whole-file writes that a crash never leaves half done: write a temporary file in the same
folder, then rename it over the target (a rename within one filesystem is atomic)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    """Indented JSON with a final newline; values JSON cannot hold are written as str()."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure as PNG (rendered in memory, then written as above)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
