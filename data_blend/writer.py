"""Writes a blended dataset folder atomically: ``data/`` (``datasets.save_to_disk``) and
``manifest.json`` are written into a temporary folder next to the output, which is renamed into
place only when complete. A failure at any point removes the temporary folder and leaves the
output as it was (absent, or the previous version)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetGenerationError

from data_blend.records import DATA_DIR, FEATURES, FORMAT, MANIFEST_NAME

logger = logging.getLogger(__name__)


def write_blended(
    output: str | Path,
    records: Iterable[dict[str, Any]],  # rows in the records.FEATURES format
    manifest: Callable[[], dict[str, Any]],  # called once every record is written
    *,
    overwrite: bool = False,  # replace an existing output folder
    progress: bool = False,  # datasets' progress bars
) -> Path:
    """Write ``records`` and the manifest to ``output``; returns the output folder."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"{output} already exists; remove it or set 'overwrite: true' in the recipe"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        staging.mkdir()
        with _progress_bars(progress):
            dataset = _build(records, staging / "cache")
            dataset.save_to_disk(str(staging / DATA_DIR))
        num_rows = len(dataset)
        del dataset
        shutil.rmtree(staging / "cache")
        content = {"format": FORMAT, **manifest(), "num_rows": num_rows}
        (staging / MANIFEST_NAME).write_text(
            json.dumps(content, indent=2, sort_keys=False) + "\n", encoding="utf-8"
        )
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %d conversations to %s", num_rows, output)
    return output


def _build(records: Iterable[dict[str, Any]], cache_dir: Path) -> datasets.Dataset:
    """The records as a Dataset, streamed to an Arrow file under ``cache_dir`` (memory does not
    grow with the dataset). The fingerprint is fixed so that datasets does not hash the
    generator; errors raised by the records' producer reach the caller unwrapped."""

    def generate() -> Iterator[dict[str, Any]]:
        yield from records

    try:
        return datasets.Dataset.from_generator(
            generate, features=FEATURES, cache_dir=str(cache_dir), fingerprint=cache_dir.parent.name
        )
    except DatasetGenerationError as exc:
        if exc.__cause__ is not None:
            raise exc.__cause__ from None
        raise


def _move_into_place(staging: Path, output: Path) -> None:
    if not output.exists():
        os.rename(staging, output)
        return
    # Replace: move the old folder aside first, so the output name always holds a full dataset.
    retired = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(output, retired)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(retired, output)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
