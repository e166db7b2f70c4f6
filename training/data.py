"""Blended datasets on disk and the order in which training reads them.

The order is a pure function of (seed, epoch): epoch e is a permutation of the records drawn
from a generator seeded with (seed, e), and epochs follow each other without a gap. A run is
then fully described by one integer, the number of samples consumed so far (the data
position), which is what a checkpoint stores: a resumed run reads exactly the micro-batches the
uninterrupted run would have read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
REQUIRED_COLUMNS = ("messages", "images")


def open_blended(folder: str | os.PathLike):
    """The `datasets.Dataset` of a data_blend output folder (manifest.json + data/)."""
    import datasets

    path = Path(folder)
    if not (path / MANIFEST_NAME).is_file() or not (path / DATA_DIR).is_dir():
        raise FileNotFoundError(
            f"{path} is not a blended dataset folder: expected {MANIFEST_NAME} and {DATA_DIR}/ "
            "as written by `visualchat blend`"
        )
    dataset = datasets.load_from_disk(str(path / DATA_DIR))
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path}: dataset lacks column(s) {missing} (has {dataset.column_names})")
    if len(dataset) == 0:
        raise ValueError(f"{path}: the dataset is empty")
    return dataset


class DataOrder:
    """Global sample position -> record index, epoch after epoch."""

    def __init__(self, num_records: int, seed: int) -> None:
        if num_records < 1:
            raise ValueError(f"num_records must be positive, got {num_records}")
        self.num_records = num_records
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, epoch])
            self._cache[epoch] = rng.permutation(self.num_records)  # (num_records,)
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """Record indices at positions start .. start + count - 1."""
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_records)
            out.append(int(self.permutation(epoch)[offset]))
        return out


def plan_micro_batches(
    order: DataOrder,
    position: int,  # global samples consumed before the first micro-batch
    num_micro_batches: int,
    batch_size: int,  # samples per rank per micro-batch
    num_processes: int,
    process_index: int,
    lengths: np.ndarray | None = None,  # (num_records,) approximate lengths to group by
    grad_accum: int = 1,
) -> list[list[int]]:
    """This rank's record indices for each of the next micro-batches. Micro-batch m takes the
    next batch_size * num_processes positions; rank r reads its r-th contiguous slice.

    With `lengths`, the grad_accum micro-batches of each optimiser step (`position` must be a
    step boundary) are re-formed from the same records sorted by length: the step reads the
    same samples, each micro-batch pads to a nearer length.
    """
    global_batch = batch_size * num_processes
    plan = []
    for m in range(num_micro_batches):
        start = position + m * global_batch + process_index * batch_size
        plan.append(order.indices(start, batch_size))
    if lengths is None or grad_accum == 1:
        return plan
    grouped = []
    for step_start in range(0, len(plan), grad_accum):
        records = [i for micro in plan[step_start : step_start + grad_accum] for i in micro]
        records.sort(key=lambda i: (lengths[i], i))
        grouped += [records[j : j + batch_size] for j in range(0, len(records), batch_size)]
    return grouped


def approximate_lengths(dataset, image_tokens: int) -> np.ndarray:
    """(num_records,) cheap token-length estimates: image blocks x image_tokens + characters / 4
    of the text. Only used to order samples, so the tokenizer is not needed."""
    lengths = np.zeros(len(dataset), dtype=np.int64)
    for index, messages in enumerate(dataset["messages"]):
        total = 0
        for message in messages:
            for block in message["content"]:
                if block.get("type") == "image":
                    total += image_tokens
                else:
                    total += len(block.get("text") or "") // 4 + 1
        lengths[index] = total + 4 * len(messages)  # role markers
    return lengths
