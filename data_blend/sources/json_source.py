"""Shared reader of the JSON conversation formats (LLaVA, MIMIC-IT/Sparkles-style dialogue).

The file is read and every record validated up front (missing fields, non-alternating turns,
image files that do not exist): bad records are logged and counted, never fatal. Images stay
paths here; they are decoded when the blender draws the sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from data_blend.sample import BadRecord, Sample, SkipLog
from data_blend.sources.turns import parse_conversations


class JsonConversationSource(Sequence[Sample]):
    """A JSON list (or JSON Lines) of records with ``conversations`` and image paths."""

    kind = "json"  # used in error messages

    def __init__(
        self,
        path: str | Path,
        images_dir: str | Path | None = None,  # root of relative image paths; default: JSON's dir
        name: str | None = None,
        max_samples: int | None = None,  # keep at most this many valid samples (in file order)
    ) -> None:
        self.path = Path(path)
        self.images_dir = Path(images_dir) if images_dir is not None else self.path.parent
        self.name = name or self.path.stem
        self.skips = SkipLog(self.name)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"{self.name}: images_dir {self.images_dir} is not a folder "
                f"(image paths in {self.path.name} are relative to it)"
            )
        self._samples: list[Sample] = []
        for index, record in self._records():
            if max_samples is not None and len(self._samples) >= max_samples:
                break
            where = f"record {index}"
            try:
                self._samples.append(self._parse(index, record))
            except BadRecord as error:
                if isinstance(record, Mapping) and "id" in record:
                    where += f" (id {record['id']!r})"
                self.skips.skip_bad(error, where)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        return self._samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def image_paths(self, record: Mapping[str, Any]) -> list[str]:
        """The record's image paths, in order; raises BadRecord."""
        raise NotImplementedError

    def _parse(self, index: int, record: Any) -> Sample:
        if not isinstance(record, Mapping):
            raise BadRecord("not_an_object", f"got {type(record).__name__}")
        paths = [self._resolve(p) for p in self.image_paths(record)]
        rounds = parse_conversations(record.get("conversations"), paths)
        record_id = record.get("id", index)
        return Sample(f"{self.name}/{record_id}", self.name, rounds)

    def _resolve(self, relative: str) -> Path:
        path = self.images_dir / relative
        if not path.is_file():
            raise BadRecord("missing_image", f"{path} does not exist")
        return path

    def _records(self) -> Iterator[tuple[int, Any]]:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.name}: {self.kind} file {self.path} does not exist")
        text = self.path.read_text(encoding="utf-8")
        if self.path.suffix == ".jsonl":
            for index, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as exc:
                    self.skips.skip("invalid_json", f"line {index + 1}", str(exc))
            return
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.name}: {self.path} is not valid JSON ({exc})") from exc
        if not isinstance(records, list):
            raise ValueError(
                f"{self.name}: {self.path} must hold a JSON list of records, "
                f"got {type(records).__name__}"
            )
        yield from enumerate(records)


def require_str(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise BadRecord("missing_field", f"no string {key!r}")
    return value
