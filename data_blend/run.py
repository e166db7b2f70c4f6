"""The entry point behind ``visualchat blend recipe.yaml``: recipe -> sources -> blend -> disk."""

from __future__ import annotations

import datetime
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_blend.blend import (
    APPROX_IMAGE_TOKENS,
    BlendConfig,
    Blender,
    LengthFn,
    approx_num_tokens,
)
from data_blend.recipe import BlendRecipe
from data_blend.records import sample_to_record
from data_blend.sample import SampleSource
from data_blend.sources import build_source
from data_blend.writer import write_blended


@dataclass(frozen=True)
class BlendSummary:
    output: Path  # the blended dataset folder written
    num_samples: int  # conversations written
    num_images: int  # images in them
    num_rounds: int  # question/answer rounds in them
    num_truncated: int  # conversations that lost trailing rounds to max_length / max_images
    source_counts: dict[str, int]  # source samples used, by source name
    realised_ratios: dict[str, float]  # source_counts normalised
    families: dict[str, int]  # assistant turns by question family ("" unknown)
    skipped: dict[str, dict[str, int]]  # bad source records, by source name then reason
    dropped: dict[str, int]  # conversations dropped by the blend, by reason
    length_measure: str  # "length_fn", "approx_num_tokens(...)" or "none"
    seconds: float  # wall time of the whole run


def run_blend(
    recipe: BlendRecipe, length_fn: LengthFn | None = None, progress: bool = True
) -> BlendSummary:
    """Build the blended dataset ``recipe`` describes and write it to ``recipe.output``.

    ``length_fn(conversation) -> int`` measures a conversation in tokens (images included) for
    ``recipe.max_length``; without one, :func:`~data_blend.blend.approx_num_tokens` estimates
    it. ``progress`` shows progress bars (stderr); nothing else is printed.
    """
    start = time.perf_counter()
    if recipe.output.exists() and not recipe.overwrite:
        raise FileExistsError(
            f"{recipe.output} already exists; remove it or set 'overwrite: true' in the recipe"
        )
    sources = [build_source(spec) for spec in recipe.sources]
    if recipe.max_length is None:
        length_measure = "none"
    elif length_fn is not None:
        length_measure = "length_fn"
    else:
        length_fn = approx_num_tokens
        length_measure = f"approx_num_tokens(num_image_tokens={APPROX_IMAGE_TOKENS})"
    config = BlendConfig(
        num_samples=recipe.num_samples,
        seed=recipe.seed,
        max_images=recipe.max_images,
        max_group=recipe.max_group,
        max_length=recipe.max_length,
        sampling=recipe.sampling,
    )
    blender = Blender(sources, recipe.weights, config, length_fn)
    families: Counter[str] = Counter()

    def records() -> Iterator[dict[str, Any]]:
        from tqdm.auto import tqdm

        with tqdm(total=recipe.num_samples, desc="blend", unit="conv", disable=not progress) as bar:
            for sample in blender:
                families.update(sample.families)
                yield sample_to_record(sample)
                bar.update()

    def manifest() -> dict[str, Any]:
        return _manifest(recipe, sources, blender, families, length_measure)

    write_blended(recipe.output, records(), manifest, overwrite=recipe.overwrite, progress=progress)
    stats = blender.stats
    counts = {source.name: stats.source_counts[source.name] for source in sources}
    return BlendSummary(
        output=recipe.output,
        num_samples=stats.num_samples,
        num_images=stats.num_images,
        num_rounds=stats.num_rounds,
        num_truncated=stats.num_truncated,
        source_counts=counts,
        realised_ratios=_ratios(counts),
        families=dict(sorted(families.items())),
        skipped={source.name: source.skips.as_dict() for source in sources},
        dropped=dict(sorted(stats.dropped.items())),
        length_measure=length_measure,
        seconds=time.perf_counter() - start,
    )


def _ratios(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {name: (count / total if total else 0.0) for name, count in counts.items()}


def _manifest(
    recipe: BlendRecipe,
    sources: list[SampleSource],
    blender: Blender,
    families: Counter[str],
    length_measure: str,
) -> dict[str, Any]:
    from visualchat import __version__

    stats = blender.stats
    counts = {source.name: stats.source_counts[source.name] for source in sources}
    realised = _ratios(counts)
    return {
        "created_by": f"visualchat {__version__} (data_blend)",
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seed": recipe.seed,
        "num_samples": stats.num_samples,
        "num_images": stats.num_images,
        "num_rounds": stats.num_rounds,
        "num_truncated": stats.num_truncated,
        "max_images": recipe.max_images,
        "max_group": recipe.max_group,
        "max_length": recipe.max_length,
        "length_measure": length_measure,
        "sampling": recipe.sampling,
        "sources": [
            {
                "name": source.name,
                "type": spec.type,
                "weight": spec.weight,
                "ratio": ratio,
                "num_available": len(source),
                "num_used": counts[source.name],
                "realised_ratio": realised[source.name],
                "skipped": source.skips.as_dict(),
            }
            for source, spec, ratio in zip(sources, recipe.sources, blender.ratios, strict=True)
        ],
        "dropped": dict(sorted(stats.dropped.items())),
        "families": dict(sorted(families.items())),
        "recipe": recipe.to_dict(),
    }
