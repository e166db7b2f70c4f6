"""VisualChat: multi-image, multi-round visual chat.

`from visualchat import VisualChat` is the entry point; heavy modules load on first use so that
`import visualchat` stays cheap for the CLI and the servers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ChatSession",
    "Conversation",
    "ImageLimits",
    "Message",
    "SamplingParams",
    "VisualChat",
    "__version__",
    "load_image",
]

_LAZY = {
    "VisualChat": "visualchat.api",
    "ChatSession": "visualchat.session",
    "Conversation": "visualchat.messages",
    "Message": "visualchat.messages",
    "ImageLimits": "visualchat.images",
    "load_image": "visualchat.images",
    "SamplingParams": "visualchat.sampling",
}

if TYPE_CHECKING:
    from visualchat.api import VisualChat
    from visualchat.images import ImageLimits, load_image
    from visualchat.messages import Conversation, Message
    from visualchat.sampling import SamplingParams
    from visualchat.session import ChatSession


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'visualchat' has no attribute {name!r}")
