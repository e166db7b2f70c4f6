"""Any ``datasets.Dataset`` with image / question / answer columns, through a column mapping.

``columns`` maps our roles to the dataset's column names: ``{"image": "img", "question": "q",
"answer": "a"}``, optionally ``"id"`` and ``"family"``. The image column may hold PIL images (an
``Image`` feature, read undecoded here), ``{"bytes", "path"}`` dicts, raw bytes, or paths
(relative to ``images_dir``). A question may place its image with an ``<image>`` marker;
otherwise the image comes first. Rows without a usable image, question or answer are skipped and
counted (``source.skips``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from data_blend.sample import BadRecord, Sample, SkipLog
from data_blend.sources.turns import parse_conversations
from visualchat.images import ImageSource

if TYPE_CHECKING:
    import datasets

REQUIRED_COLUMNS = ("image", "question", "answer")
OPTIONAL_COLUMNS = ("id", "family")


class HFColumnsSource(Sequence[Sample]):
    def __init__(
        self,
        dataset: datasets.Dataset,
        columns: Mapping[str, str],  # our role -> the dataset's column name
        name: str = "hf_columns",
        images_dir: str | Path | None = None,  # root of relative image paths
        max_samples: int | None = None,  # keep at most this many valid rows (in order)
    ) -> None:
        import datasets

        self.name = name
        self.skips = SkipLog(name)
        self.columns = _check_columns(name, columns, dataset.column_names)
        self.images_dir = Path(images_dir) if images_dir is not None else None
        image_column = self.columns["image"]
        if isinstance(dataset.features.get(image_column), datasets.Image):
            # Undecoded: the encoded bytes are kept, decoding happens when a sample is drawn.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self._dataset = dataset.select_columns(list(dict.fromkeys(self.columns.values())))
        self._rows: list[int] = []  # dataset row of each valid sample
        for row_index, row in enumerate(self._dataset):
            if max_samples is not None and len(self._rows) >= max_samples:
                break
            try:
                self._sample(row_index, row)
                self._rows.append(row_index)
            except BadRecord as error:
                self.skips.skip_bad(error, f"row {row_index}")

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        columns: Mapping[str, str],
        split: str = "train",
        name: str = "hf_columns",
        images_dir: str | Path | None = None,
        max_samples: int | None = None,
    ) -> HFColumnsSource:
        """A folder written by ``save_to_disk``, or anything ``datasets.load_dataset`` reads (a
        data file or folder of parquet / json / csv, a dataset script folder, a Hub name)."""
        import datasets

        path = Path(path)
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(
                        f"{name}: split {split!r} not in {path} (splits: {', '.join(loaded)})"
                    )
                loaded = loaded[split]
        elif path.is_file():
            builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
            loaded = datasets.load_dataset(builder, data_files=str(path), split=split)
        else:
            loaded = datasets.load_dataset(str(path), split=split)
        return cls(loaded, columns, name, images_dir, max_samples)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        row_index = self._rows[index]
        return self._sample(row_index, self._dataset[row_index])

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def _sample(self, row_index: int, row: Mapping[str, Any]) -> Sample:
        question, answer = row[self.columns["question"]], row[self.columns["answer"]]
        if not isinstance(question, str) or not question.strip():
            raise BadRecord("missing_field", "no question text")
        if not isinstance(answer, str) or not answer.strip():
            raise BadRecord("missing_field", "no answer text")
        image = self._image(row[self.columns["image"]])
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        rounds = parse_conversations(turns, [image])
        if "family" in self.columns:
            rounds[0].family = str(row[self.columns["family"]] or "")
        sample_id = row[self.columns["id"]] if "id" in self.columns else row_index
        return Sample(f"{self.name}/{sample_id}", self.name, rounds)

    def _image(self, value: Any) -> ImageSource:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, Mapping):  # the Image feature's {"bytes", "path"} storage
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, bytes | bytearray) and value:
            return bytes(value)
        if isinstance(value, str | os.PathLike) and os.fspath(value):
            path = Path(value)
            if self.images_dir is not None and not path.is_absolute():
                path = self.images_dir / path
            if not path.is_file():
                raise BadRecord("missing_image", f"{path} does not exist")
            return path
        raise BadRecord("missing_image", f"unusable image value {type(value).__name__}")


def _check_columns(name: str, columns: Mapping[str, str], available: list[str]) -> dict[str, str]:
    missing = [role for role in REQUIRED_COLUMNS if role not in columns]
    if missing:
        raise ValueError(
            f"{name}: columns must map {', '.join(REQUIRED_COLUMNS)} to dataset columns "
            f"(missing: {', '.join(missing)}); e.g. {{image: img, question: q, answer: a}}"
        )
    unknown = [role for role in columns if role not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise ValueError(
            f"{name}: unknown column role(s) {', '.join(unknown)} "
            f"(known: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})"
        )
    absent = [column for column in columns.values() if column not in available]
    if absent:
        raise ValueError(
            f"{name}: column(s) {', '.join(absent)} not in the dataset "
            f"(its columns: {', '.join(available)})"
        )
    return dict(columns)
