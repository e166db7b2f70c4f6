"""Blend recipes: typed dataclasses loaded from YAML and validated with actionable errors.

```yaml
output: data/blends/mix          # the blended dataset folder to write
seed: 0
num_samples: 1000                # blended conversations
max_images: 8                    # per conversation
max_group: 3                     # single-image samples merged into one conversation, at most
max_length: 2048                 # tokens per conversation (optional; see run_blend)
sampling: random                 # random (with replacement) | sequential (in order, cycling)
overwrite: false                 # replace an existing output folder
sources:
  - {name: coco, type: llava, weight: 2, path: llava.json, images_dir: images/}
  - {name: vqa, type: hf_columns, path: vqa_saved/, split: train,
     columns: {image: img, question: q, answer: a}}
  - {name: sparkles, type: dialogue, path: dialogue.json, images_dir: images/}
  - {name: synth, type: synthetic, split: train, num_samples: 100000,
     config: {image_size: 96, max_images: 4}}
```

Relative paths are used as written, i.e. relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from data_blend.sources.synthetic import SyntheticConfig

SourceType = Literal["llava", "hf_columns", "dialogue", "synthetic"]
SOURCE_TYPES: tuple[str, ...] = get_args(SourceType)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # no "+", "/": they join names and ids in records
_COMMON_KEYS = ("name", "type", "weight")
# Keys each source type takes besides name/type/weight; the first ones listed are required.
_TYPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llava": (("path",), ("images_dir", "num_samples")),
    "dialogue": (("path",), ("images_dir", "num_samples")),
    "hf_columns": (("path", "columns"), ("split", "images_dir", "num_samples")),
    "synthetic": ((), ("split", "num_samples", "seed", "config")),
}
_PATH_HELP = {
    "llava": "the LLaVA JSON file",
    "dialogue": "the dialogue JSON file",
    "hf_columns": "a save_to_disk folder, a data file, or a dataset name",
}
DEFAULT_SYNTHETIC_POOL = 100_000


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says where and how to fix it."""


@dataclass(frozen=True)
class SourceSpec:
    name: str  # unique in the recipe; letters, digits, "_", "-", "."
    type: SourceType
    weight: float = 1.0  # sampling weight, normalised over the sources
    path: Path | None = None  # llava / dialogue JSON; hf_columns dataset
    images_dir: Path | None = None  # root of relative image paths (default: the JSON's folder)
    columns: dict[str, str] | None = None  # hf_columns: {image, question, answer[, id, family]}
    split: str | None = None  # hf_columns: dataset split ("train"); synthetic: train | heldout
    num_samples: int | None = None  # at most this many source samples (synthetic: pool size)
    seed: int | None = None  # synthetic: world seed (default: the recipe's seed)
    config: dict[str, Any] = field(default_factory=dict)  # synthetic: SyntheticConfig fields

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {
            k: str(v) if isinstance(v, Path) else v for k, v in data.items() if v not in (None, {})
        }


@dataclass(frozen=True)
class BlendRecipe:
    output: Path  # the blended dataset folder
    sources: tuple[SourceSpec, ...]
    num_samples: int  # blended conversations
    seed: int = 0
    max_images: int = 8  # images per conversation
    max_group: int = 3  # single-image samples merged into one conversation, at most
    max_length: int | None = None  # tokens per conversation; None: no limit
    sampling: Literal["random", "sequential"] = "random"
    overwrite: bool = False  # replace an existing output folder

    @classmethod
    def from_yaml(cls, path: str | Path) -> BlendRecipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> BlendRecipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: a recipe is a mapping of keys (output, sources, ...)")
        known = [f.name for f in dataclasses.fields(cls)]
        _check_keys(data, known, ("output", "sources", "num_samples"), where)
        raw_sources = data["sources"]
        if not isinstance(raw_sources, list) or not raw_sources:
            raise RecipeError(f"{where}: 'sources' must be a non-empty list of sources")
        sources = tuple(
            _source(raw, data.get("seed", 0), f"{where}: sources[{i}]")
            for i, raw in enumerate(raw_sources)
        )
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RecipeError(f"{where}: source names must be unique; repeated: {duplicates}")
        max_length = data.get("max_length")
        sampling = data.get("sampling", "random")
        if sampling not in ("random", "sequential"):
            raise RecipeError(
                f"{where}: sampling must be 'random' or 'sequential', got {sampling!r}"
            )
        return cls(
            output=Path(_str(data["output"], "output", where)),
            sources=sources,
            num_samples=_int(data["num_samples"], "num_samples", where),
            seed=_int(data.get("seed", 0), "seed", where, minimum=0),
            max_images=_int(data.get("max_images", 8), "max_images", where),
            max_group=_int(data.get("max_group", 3), "max_group", where),
            max_length=None if max_length is None else _int(max_length, "max_length", where),
            sampling=sampling,
            overwrite=_bool(data.get("overwrite", False), "overwrite", where),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "max_images": self.max_images,
            "max_group": self.max_group,
            "max_length": self.max_length,
            "sampling": self.sampling,
            "overwrite": self.overwrite,
            "sources": [source.to_dict() for source in self.sources],
        }

    @property
    def weights(self) -> list[float]:
        return [source.weight for source in self.sources]


def _source(raw: Any, recipe_seed: Any, where: str) -> SourceSpec:
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: a source is a mapping with name, type, weight, ...")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RecipeError(
            f"{where}: 'name' must be letters, digits, '_', '-' or '.' (got {name!r})"
        )
    where = f"{where} ({name})"
    kind = raw.get("type")
    if kind not in SOURCE_TYPES:
        raise RecipeError(f"{where}: 'type' must be one of {', '.join(SOURCE_TYPES)}, got {kind!r}")
    required, optional = _TYPE_KEYS[kind]
    try:
        _check_keys(raw, _COMMON_KEYS + required + optional, _COMMON_KEYS[:2] + required, where)
    except RecipeError as exc:
        if "path" in required and "path" not in raw:
            raise RecipeError(f"{exc} ({_PATH_HELP[kind]})") from exc
        raise
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise RecipeError(f"{where}: 'weight' must be a positive number, got {weight!r}")
    num_samples = raw.get("num_samples")
    split = raw.get("split")
    config = raw.get("config") or {}
    columns = raw.get("columns")
    if kind == "synthetic":
        split = split or "train"
        if split not in ("train", "heldout"):
            raise RecipeError(f"{where}: synthetic 'split' must be train or heldout, got {split!r}")
        if not isinstance(config, Mapping):
            raise RecipeError(f"{where}: 'config' must be a mapping of SyntheticConfig fields")
        try:
            SyntheticConfig.from_dict(config)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{where}: config: {exc}") from exc
        num_samples = DEFAULT_SYNTHETIC_POOL if num_samples is None else num_samples
    if kind == "hf_columns":
        split = split or "train"
        if not isinstance(columns, Mapping) or not all(
            isinstance(v, str) for v in columns.values()
        ):
            raise RecipeError(
                f"{where}: 'columns' maps image, question, answer to column names, "
                "e.g. {image: img, question: q, answer: a}"
            )
        missing = [role for role in ("image", "question", "answer") if role not in columns]
        if missing:
            raise RecipeError(f"{where}: 'columns' lacks {', '.join(missing)}")
    seed = raw.get("seed", recipe_seed)
    return SourceSpec(
        name=name,
        type=kind,
        weight=float(weight),
        path=Path(_str(raw["path"], "path", where)) if "path" in raw else None,
        images_dir=Path(_str(raw["images_dir"], "images_dir", where))
        if raw.get("images_dir") is not None
        else None,
        columns=dict(columns) if columns is not None else None,
        split=None if split is None else _str(split, "split", where),
        num_samples=None if num_samples is None else _int(num_samples, "num_samples", where),
        seed=_int(seed, "seed", where, minimum=0) if kind == "synthetic" else None,
        config=dict(config),
    )


def _check_keys(
    data: Mapping[str, Any],
    known: tuple[str, ...] | list[str],
    required: tuple[str, ...],
    where: str,
) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(known)}")
    missing = [key for key in required if key not in data or data[key] is None]
    if missing:
        raise RecipeError(f"{where}: missing required key(s): {', '.join(missing)}")


def _int(value: Any, name: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"{where}: '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def _str(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str | Path) or not str(value):
        raise RecipeError(f"{where}: '{name}' must be a non-empty string, got {value!r}")
    return str(value)


def _bool(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{where}: '{name}' must be true or false, got {value!r}")
    return value
