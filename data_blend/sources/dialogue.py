"""Multi-image dialogue JSON, as in MIMIC-IT / Sparkles: ``[{"id", "images": ["a.png", "b.png"],
"conversations": [{"from": "human", "value": "... <image> ... <image> ..."}, {"from": "gpt",
...}, ...]}]``.

``<image>`` markers in human turns take the images in order; images beyond the markers go to
the start of the first human turn. Bad records are skipped and counted (``source.skips``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data_blend.sample import BadRecord
from data_blend.sources.json_source import JsonConversationSource


class DialogueSource(JsonConversationSource):
    kind = "dialogue JSON"

    def image_paths(self, record: Mapping[str, Any]) -> list[str]:
        images = record.get("images")
        if not isinstance(images, list) or not images:
            raise BadRecord("missing_field", "'images' must be a non-empty list of paths")
        if not all(isinstance(path, str) and path for path in images):
            raise BadRecord("missing_field", "'images' must hold path strings")
        return images
