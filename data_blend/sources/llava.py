"""LLaVA-format JSON: ``[{"id", "image": "rel/path.jpg", "conversations": [{"from": "human" |
"gpt", "value": "<image>\\nWhat is ..."}]}]`` with an image folder.

The ``<image>`` marker says where the image goes; without one, the image comes before the first
question. Records with a missing image file, missing fields or non-alternating turns are skipped
and counted (``source.skips``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data_blend.sources.json_source import JsonConversationSource, require_str


class LlavaSource(JsonConversationSource):
    kind = "LLaVA JSON"

    def image_paths(self, record: Mapping[str, Any]) -> list[str]:
        return [require_str(record, "image")]
