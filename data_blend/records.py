"""The on-disk record format of a blended dataset: the contract with training and evaluation.

A blended dataset is a folder: ``manifest.json`` and ``data/`` (a ``datasets.Dataset`` written
with ``save_to_disk``). One row is one conversation:

- ``id``: str, unique in the dataset;
- ``source``: str, the source name (sources joined with "+" when a blend mixes several);
- ``messages``: list of ``{"role": str, "content": [{"type": "text" | "image", "text": str |
  None}]}`` (HF chat style); an ``{"type": "image"}`` block takes the next image of ``images``;
- ``images``: ``Sequence(Image())``, PIL images stored as PNG bytes, in conversation order;
- ``families``: list[str], one per assistant turn (question family, "" when unknown);
- ``scenes``: list[str], one JSON scene description per image ("" for non-synthetic images).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from data_blend.sample import Sample
from visualchat.images import ImageLimits, ImageSource, load_image
from visualchat.messages import Conversation

FORMAT = "visualchat-blend/1"  # manifest["format"]; bump when the columns change
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
COLUMNS = ("id", "source", "messages", "images", "families", "scenes")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Training data is read from trusted local files, in any number per conversation.
_LIMITS = ImageLimits(max_images=1_000_000)


class NotABlendedDatasetError(FileNotFoundError):
    """A folder that is not a blended dataset (no manifest, no data, wrong format)."""


FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "messages": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.List(
                    {"type": datasets.Value("string"), "text": datasets.Value("string")}
                ),
            }
        ),
        "images": datasets.Sequence(datasets.Image()),  # PNG bytes; decoded to PIL on read
        "families": datasets.List(datasets.Value("string")),
        "scenes": datasets.List(datasets.Value("string")),
    }
)


def conversation_to_record(
    conversation: Conversation,
    *,
    record_id: str,
    source: str,
    families: Sequence[str] | None = None,  # one per assistant turn; default all ""
    scenes: Sequence[str] | None = None,  # one per image; default all ""
) -> dict[str, Any]:
    """A row of the blended dataset; images are loaded and encoded as PNG bytes."""
    hf_messages, images = conversation.to_hf()
    num_replies = sum(message["role"] == "assistant" for message in hf_messages)
    families = list(families) if families is not None else [""] * num_replies
    scenes = list(scenes) if scenes is not None else [""] * len(images)
    if len(families) != num_replies:
        raise ValueError(
            f"record {record_id}: {len(families)} families for {num_replies} assistant turns"
        )
    if len(scenes) != len(images):
        raise ValueError(f"record {record_id}: {len(scenes)} scenes for {len(images)} images")
    messages = [
        {
            "role": message["role"],
            "content": [
                {"type": block["type"], "text": block.get("text")} for block in message["content"]
            ],
        }
        for message in hf_messages
    ]
    return {
        "id": record_id,
        "source": source,
        "messages": messages,
        "images": [{"bytes": png_bytes(image), "path": None} for image in images],
        "families": families,
        "scenes": scenes,
    }


def sample_to_record(sample: Sample) -> dict[str, Any]:
    return conversation_to_record(
        sample.to_conversation(),
        record_id=sample.sample_id,
        source=sample.source,
        families=sample.families,
        scenes=sample.scenes,
    )


def record_to_conversation(record: Mapping[str, Any]) -> Conversation:
    """The conversation of a row (as ``datasets`` returns it: PIL images, or ``{"bytes",
    "path"}`` dicts when the image column is not decoded)."""
    images = [_image_source(image) for image in record["images"]]
    return Conversation.from_hf(record["messages"], images)


def png_bytes(source: ImageSource) -> bytes:
    """PNG-encoded RGB bytes of an image source; PNG bytes pass through untouched."""
    if isinstance(source, bytes) and source.startswith(_PNG_SIGNATURE):
        return source
    buffer = io.BytesIO()
    load_image(source, _LIMITS).save(buffer, format="PNG")
    return buffer.getvalue()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the blended dataset folder ``path``."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise NotABlendedDatasetError(
            f"{path} is not a blended dataset: it has no {MANIFEST_NAME} "
            "(build one with `visualchat blend recipe.yaml`)"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise NotABlendedDatasetError(
            f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}; "
            "rebuild the dataset with this version's `visualchat blend`"
        )
    return manifest


def load_blended(path: str | Path) -> datasets.Dataset:
    """The dataset of a blended dataset folder (``manifest.json`` + ``data/``)."""
    path = Path(path)
    read_manifest(path)
    data_path = path / DATA_DIR
    if not (data_path / "dataset_info.json").is_file():
        raise NotABlendedDatasetError(
            f"{path} is not a complete blended dataset: {data_path} holds no saved dataset"
        )
    dataset = datasets.load_from_disk(str(data_path))
    missing = [column for column in COLUMNS if column not in dataset.column_names]
    if missing:
        raise NotABlendedDatasetError(f"{data_path}: missing column(s) {', '.join(missing)}")
    return dataset


def _image_source(image: Any) -> ImageSource:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Mapping):
        if image.get("bytes"):
            return bytes(image["bytes"])
        if image.get("path"):
            return str(image["path"])
    raise ValueError(f"unusable image in record: {type(image).__name__}")
