"""Source adapters: each reads one kind of data and yields :class:`~data_blend.sample.Sample` s,
skipping (and counting, in ``source.skips``) the records it cannot use.

- :mod:`.llava` — LLaVA-format JSON with an image folder;
- :mod:`.hf_columns` — any ``datasets.Dataset`` with image / question / answer columns;
- :mod:`.dialogue` — multi-image dialogue JSON (MIMIC-IT / Sparkles style);
- :mod:`.synthetic` — the synthetic multi-image world (scenes in :mod:`.scenes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from data_blend.sample import SampleSource

if TYPE_CHECKING:
    from data_blend.recipe import SourceSpec


def build_source(spec: SourceSpec) -> SampleSource:
    """The adapter a recipe's source entry describes (reads and validates its records)."""
    if spec.type == "synthetic":
        from data_blend.sources.synthetic import SyntheticConfig, SyntheticSource, SyntheticWorld

        world = SyntheticWorld(SyntheticConfig.from_dict(spec.config))
        split: Any = spec.split or "train"  # "train" | "heldout", checked by the recipe
        pool = spec.num_samples or 100_000
        return SyntheticSource(world, split, pool, spec.seed or 0, spec.name)
    if spec.path is None:
        raise ValueError(f"source {spec.name!r}: a {spec.type} source needs a 'path'")
    if spec.type == "hf_columns":
        from data_blend.sources.hf_columns import HFColumnsSource

        if spec.columns is None:
            raise ValueError(f"source {spec.name!r}: an hf_columns source needs 'columns'")
        return HFColumnsSource.from_path(
            spec.path,
            spec.columns,
            spec.split or "train",
            spec.name,
            spec.images_dir,
            spec.num_samples,
        )
    if spec.type == "llava":
        from data_blend.sources.llava import LlavaSource

        return LlavaSource(spec.path, spec.images_dir, spec.name, spec.num_samples)
    if spec.type == "dialogue":
        from data_blend.sources.dialogue import DialogueSource

        return DialogueSource(spec.path, spec.images_dir, spec.name, spec.num_samples)
    raise ValueError(f"source {spec.name!r}: unknown type {spec.type!r}")
