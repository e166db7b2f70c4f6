"""Data blending: sources -> blended multi-image, multi-round conversations on disk.

``run_blend(BlendRecipe.from_yaml(path))`` builds a blended dataset folder (``manifest.json`` +
``data/``, a ``datasets`` save) that training and evaluation read with :func:`load_blended`.
Heavy imports (``datasets``) happen in the modules that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_blend.recipe import BlendRecipe, SourceSpec
    from data_blend.records import load_blended, record_to_conversation
    from data_blend.run import BlendSummary, run_blend

__all__ = [
    "BlendRecipe",
    "BlendSummary",
    "SourceSpec",
    "load_blended",
    "record_to_conversation",
    "run_blend",
]

_LAZY = {
    "BlendRecipe": "data_blend.recipe",
    "SourceSpec": "data_blend.recipe",
    "load_blended": "data_blend.records",
    "record_to_conversation": "data_blend.records",
    "BlendSummary": "data_blend.run",
    "run_blend": "data_blend.run",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_blend' has no attribute {name!r}")
