"""Conversation, Message and their parts; the only module that knows the outside dialects.

Everything past this module sees a :class:`Conversation`: a list of messages whose parts are
text or an image *source* (path, URL, bytes or PIL image, loaded later by the processor with
``visualchat.images.load_image``). Three outside dialects are translated here and nowhere else:

- OpenAI chat messages: string content or ``text`` / ``image_url`` parts (data-URL images);
- HF chat-template messages: ``{"type": "text"}`` / ``{"type": "image"}`` blocks, the images
  either inline in the block or handed over as a separate list;
- Gradio chatbot history: the normalized shape a Python chat function receives
  (``{"type": "file", "file": {...}}`` items), the client / postprocess shape (``"content"`` a
  string, a ``{"path": ...}`` dict or a list of those), legacy ``[user, bot]`` pairs, and
  ``gr.ChatMessage``-like objects.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal, get_args

from PIL import Image

from visualchat.images import DEFAULT_LIMITS, ImageLimits, ImageSource, load_image

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)

# Image URLs accepted from the network side. A bare filesystem path is refused: it would let a
# client name files on the server (file:// URLs are refused later by ImageLimits on that side).
_NETWORK_IMAGE_URL_PREFIXES = ("data:", "http://", "https://", "file:")
_SOURCE_TYPES = (str, os.PathLike, bytes, Image.Image)


@dataclass(frozen=True)
class TextPart:
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"TextPart.text must be a str, got {type(self.text).__name__}")


@dataclass(frozen=True)
class ImagePart:
    image: ImageSource  # raw source: PIL image, path, bytes or URL string; loaded later
    name: str | None = None  # shown in error messages (file name, "messages[2].content[0]")

    def __post_init__(self) -> None:
        if not isinstance(self.image, _SOURCE_TYPES):
            raise TypeError(
                f"ImagePart.image must be a path, URL string, bytes or PIL image, "
                f"got {type(self.image).__name__}"
            )


Part = TextPart | ImagePart


@dataclass
class Message:
    role: Role
    parts: list[Part]  # in reading order; images sit where the user put them

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        self.parts = list(self.parts)
        for part in self.parts:
            if not isinstance(part, TextPart | ImagePart):
                raise TypeError(f"message parts must be TextPart or ImagePart, got {part!r}")
        if self.role != "user" and self.images:
            raise ValueError(f"{self.role} messages cannot hold images; only user messages can")

    @property
    def text(self) -> str:
        """The text parts joined with newlines."""
        return "\n".join(part.text for part in self.parts if isinstance(part, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [part for part in self.parts if isinstance(part, ImagePart)]


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    def add_system(self, text: str) -> Message:
        if self.messages:
            raise ValueError("the system message must come first; add it before any other message")
        return self._append(Message("system", [TextPart(text)]))

    def add_user(self, text: str = "", images: Sequence[ImageSource] = ()) -> Message:
        """A user turn: the images (in the order given) come before the text."""
        if isinstance(images, _SOURCE_TYPES):
            raise TypeError("images must be a list of image sources, not a single source")
        parts: list[Part] = [ImagePart(image) for image in images]
        if text:
            parts.append(TextPart(text))
        if not parts:
            raise ValueError("a user message needs text or at least one image")
        return self._append(Message("user", parts))

    def add_assistant(self, text: str) -> Message:
        return self._append(Message("assistant", [TextPart(text)]))

    @property
    def system(self) -> str | None:
        """The system prompt, when the first message is a system message."""
        if self.messages and self.messages[0].role == "system":
            return self.messages[0].text
        return None

    def images(self) -> list[ImagePart]:
        """Every image part of the conversation, in order."""
        return [image for message in self.messages for image in message.images]

    @property
    def num_images(self) -> int:
        return sum(len(message.images) for message in self.messages)

    def copy(self) -> Conversation:
        """A new conversation over a copy of the message list (messages are shared)."""
        return Conversation(list(self.messages))

    def __len__(self) -> int:
        return len(self.messages)

    def _append(self, message: Message) -> Message:
        self.messages.append(message)
        return message

    # --- OpenAI ---------------------------------------------------------------------------

    @classmethod
    def from_openai(cls, messages: Sequence[Mapping[str, Any]]) -> Conversation:
        """Parse OpenAI chat ``messages``; errors name the offending ``messages[i]``."""
        return cls([_message_from_openai(f"messages[{i}]", m) for i, m in enumerate(messages)])

    def to_openai(self, limits: ImageLimits = DEFAULT_LIMITS) -> list[dict[str, Any]]:
        """OpenAI chat messages. Text-only messages get string content; images become
        ``image_url`` parts (URL strings pass through, other sources become PNG data URLs)."""
        return [_message_to_openai(message, limits) for message in self.messages]

    # --- HF chat templates ----------------------------------------------------------------

    @classmethod
    def from_hf(
        cls, messages: Sequence[Mapping[str, Any]], images: Sequence[ImageSource] = ()
    ) -> Conversation:
        """Parse HF chat-template messages. A bare ``{"type": "image"}`` block takes the next
        image from ``images``; a block may instead carry its own ``image`` / ``url`` / ``path``."""
        pending = _ImageQueue(images)
        conversation = cls(
            [_message_from_hf(f"messages[{i}]", m, pending) for i, m in enumerate(messages)]
        )
        pending.check_all_used()
        return conversation

    def to_hf(self) -> tuple[list[dict[str, Any]], list[ImageSource]]:
        """HF chat-template messages with bare ``{"type": "image"}`` blocks, and their images."""
        hf_messages = []
        for message in self.messages:
            content = [
                {"type": "text", "text": part.text}
                if isinstance(part, TextPart)
                else {"type": "image"}
                for part in message.parts
            ]
            hf_messages.append({"role": message.role, "content": content})
        return hf_messages, [image.image for image in self.images()]

    # --- Gradio ---------------------------------------------------------------------------

    @classmethod
    def from_gradio(
        cls, history: Sequence[Any] | None, message: str | Mapping[str, Any] | None = None
    ) -> Conversation:
        """Parse a Gradio chatbot ``history`` plus the new ``message`` (a multimodal textbox
        value ``{"text": ..., "files": [...]}`` or a string), appended as the last user turn.

        Consecutive user entries are merged into one message (Gradio gives every uploaded file
        its own entry); so are consecutive assistant entries. Thoughts (assistant entries whose
        metadata has a ``title``) are skipped.
        """
        turns = list(_gradio_turns(history or []))
        if message is not None:
            turns.append(("user", _gradio_new_message_parts(message)))
        conversation = cls()
        for role, parts in turns:
            if not parts and role != "assistant":
                continue  # an empty reply still keeps user/assistant alternation; others don't
            previous = conversation.messages[-1] if conversation.messages else None
            if previous is not None and previous.role == role and role != "system":
                previous.parts.extend(parts)
            else:
                conversation.messages.append(Message(role, parts))  # type: ignore[arg-type]
        return conversation


# --- shared helpers -------------------------------------------------------------------------


def _build_message(where: str, role: str, parts: list[Part]) -> Message:
    try:
        return Message(role, parts)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _as_mapping(where: str, value: Any, what: str) -> Mapping[str, Any]:
    """A dict view of ``value``: a mapping, a pydantic model, or an object with attributes."""
    if isinstance(value, Mapping):
        return value
    if hasattr(value, "model_dump"):  # Gradio's pydantic models (Message, FileData, ...)
        return value.model_dump()
    if what == "message" and hasattr(value, "role") and hasattr(value, "content"):
        return {
            "role": value.role,
            "content": value.content,
            "metadata": getattr(value, "metadata", None),
        }
    raise ValueError(f"{where}: expected a {what} object, got {type(value).__name__}")


def _role(where: str, role: Any, aliases: Mapping[str, str]) -> str:
    if role in aliases:
        return aliases[role]
    raise ValueError(
        f"{where}: unsupported role {role!r} (supported: {', '.join(aliases)}; "
        "tool and function messages are not supported)"
    )


def _text(where: str, value: Any) -> TextPart:
    if not isinstance(value, str):
        raise ValueError(f"{where}: text must be a string, got {type(value).__name__}")
    return TextPart(value)


# --- OpenAI dialect -------------------------------------------------------------------------

_OPENAI_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


def _message_from_openai(where: str, raw: Any) -> Message:
    message = _as_mapping(where, raw, "message")
    role = _role(where, message.get("role"), _OPENAI_ROLES)
    if message.get("tool_calls") or message.get("function_call"):
        raise ValueError(f"{where}: tool calls are not supported")
    content = message.get("content")
    if content is None and role == "assistant":
        parts: list[Part] = []
    elif isinstance(content, str):
        parts = [TextPart(content)]
    elif isinstance(content, list):
        parts = [_part_from_openai(f"{where}.content[{j}]", p) for j, p in enumerate(content)]
    else:
        raise ValueError(
            f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    return _build_message(where, role, parts)


def _openai_text_part(where: str, part: Mapping[str, Any]) -> Part:
    return _text(where, part.get("text"))


def _openai_image_part(where: str, part: Mapping[str, Any]) -> Part:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str):
        raise ValueError(f"{where}: image_url needs a 'url' string")
    if not url.lower().startswith(_NETWORK_IMAGE_URL_PREFIXES):
        raise ValueError(
            f"{where}: image URL must be a data:, http(s):// or file:// URL, "
            f"not a bare path ({url[:80]!r})"
        )
    return ImagePart(url, name=where)


_OPENAI_PART_PARSERS: dict[str, Callable[[str, Mapping[str, Any]], Part]] = {
    "text": _openai_text_part,
    "image_url": _openai_image_part,
}


def _part_from_openai(where: str, raw: Any) -> Part:
    part = _as_mapping(where, raw, "content part")
    parser = _OPENAI_PART_PARSERS.get(part.get("type"))  # type: ignore[arg-type]
    if parser is None:
        raise ValueError(
            f"{where}: unsupported content part type {part.get('type')!r} "
            f"(supported: {', '.join(_OPENAI_PART_PARSERS)})"
        )
    return parser(where, part)


def _message_to_openai(message: Message, limits: ImageLimits) -> dict[str, Any]:
    if not message.images:
        return {"role": message.role, "content": message.text}
    content = [
        {"type": "text", "text": part.text}
        if isinstance(part, TextPart)
        else {"type": "image_url", "image_url": {"url": _image_url(part, limits)}}
        for part in message.parts
    ]
    return {"role": message.role, "content": content}


def _image_url(part: ImagePart, limits: ImageLimits) -> str:
    source = part.image
    if isinstance(source, str) and source.lower().startswith(_NETWORK_IMAGE_URL_PREFIXES):
        return source
    buffer = io.BytesIO()
    load_image(source, limits, name=part.name).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- HF dialect -----------------------------------------------------------------------------

_HF_ROLES = {role: role for role in ROLES}
_HF_IMAGE_KEYS = ("image", "url", "path")


class _ImageQueue:
    """The ``images`` list of an HF call, handed out to bare image blocks in order."""

    def __init__(self, images: Sequence[ImageSource]) -> None:
        if isinstance(images, _SOURCE_TYPES):
            raise TypeError("images must be a list of image sources, not a single source")
        self._images = list(images)
        self._num_used = 0

    def next(self, where: str) -> ImagePart:
        if self._num_used >= len(self._images):
            raise ValueError(
                f"{where}: more image blocks than images; only {len(self._images)} image(s) given"
            )
        self._num_used += 1
        return ImagePart(self._images[self._num_used - 1], name=f"images[{self._num_used - 1}]")

    def check_all_used(self) -> None:
        if self._num_used != len(self._images):
            raise ValueError(
                f"{len(self._images)} image(s) given but only {self._num_used} "
                '{"type": "image"} block(s) in the messages'
            )


def _message_from_hf(where: str, raw: Any, pending: _ImageQueue) -> Message:
    message = _as_mapping(where, raw, "message")
    role = _role(where, message.get("role"), _HF_ROLES)
    content = message.get("content")
    if isinstance(content, str):
        parts: list[Part] = [TextPart(content)]
    elif isinstance(content, list):
        parts = [
            _part_from_hf(f"{where}.content[{j}]", block, pending)
            for j, block in enumerate(content)
        ]
    else:
        raise ValueError(
            f"{where}: content must be a string or a list of blocks, got {type(content).__name__}"
        )
    return _build_message(where, role, parts)


def _part_from_hf(where: str, raw: Any, pending: _ImageQueue) -> Part:
    block = _as_mapping(where, raw, "content block")
    kind = block.get("type")
    if kind == "text":
        return _text(where, block.get("text"))
    if kind == "image":
        source = next((block[key] for key in _HF_IMAGE_KEYS if block.get(key) is not None), None)
        return pending.next(where) if source is None else ImagePart(source, name=where)
    raise ValueError(f"{where}: unsupported content block type {kind!r} (supported: text, image)")


# --- Gradio dialect -------------------------------------------------------------------------

_GRADIO_ROLES = {role: role for role in ROLES}


def _gradio_turns(history: Sequence[Any]) -> Iterator[tuple[str, list[Part]]]:
    """(role, parts) per history entry, thoughts dropped, in order."""
    for index, entry in enumerate(history):
        where = f"history[{index}]"
        if isinstance(entry, list | tuple):  # legacy pair: [user, bot]
            if len(entry) != 2:
                raise ValueError(f"{where}: a tuples-format entry must be [user, bot]")
            for role, item in zip(("user", "assistant"), entry, strict=True):
                if item is not None:
                    yield role, _build_message(where, role, _gradio_parts(where, [item])).parts
            continue
        message = _as_mapping(where, entry, "message")
        role = _role(where, message.get("role"), _GRADIO_ROLES)
        metadata = message.get("metadata") or {}
        if role == "assistant" and metadata.get("title"):
            continue  # a thought ("Thinking...", tool use), not part of the reply
        content = message.get("content")
        items = content if isinstance(content, list) else [content]
        yield role, _build_message(where, role, _gradio_parts(where, items)).parts


def _gradio_parts(where: str, items: Sequence[Any]) -> list[Part]:
    parts = [_gradio_part(where, item) for item in items]
    return [part for part in parts if part is not None]


def _gradio_part(where: str, item: Any) -> Part | None:
    if item is None or item == "":
        return None
    if isinstance(item, str):
        return TextPart(item)
    if isinstance(item, tuple):  # tuples format: (path,) or (path, alt_text)
        return _gradio_file(where, {"path": item[0]})
    item = _as_mapping(where, item, "chat content")
    parser = _GRADIO_TYPED_ITEMS.get(item.get("type"))  # type: ignore[arg-type]
    if parser is not None:
        return parser(where, item)
    if "path" in item:  # FileDataDict or {"path": ...}, the client / postprocess shape
        return _gradio_file(where, item)
    if "file" in item:
        return _gradio_file(where, _as_mapping(where, item["file"], "file"))
    raise ValueError(f"{where}: unsupported Gradio content {dict(item)!r}")


def _gradio_text_item(where: str, item: Mapping[str, Any]) -> Part | None:
    return _text(where, item.get("text")) if item.get("text") else None


def _gradio_file_item(where: str, item: Mapping[str, Any]) -> Part:
    return _gradio_file(where, _as_mapping(where, item.get("file"), "file"))


def _gradio_component_item(where: str, item: Mapping[str, Any]) -> Part:
    value = item.get("value")
    if item.get("component") == "image" and isinstance(value, Mapping) and "path" in value:
        return _gradio_file(where, value)
    raise ValueError(
        f"{where}: unsupported Gradio component {item.get('component')!r} in the chat history "
        "(only text and image files can be sent)"
    )


_GRADIO_TYPED_ITEMS: dict[str, Callable[[str, Mapping[str, Any]], Part | None]] = {
    "text": _gradio_text_item,
    "file": _gradio_file_item,
    "component": _gradio_component_item,
}


def _gradio_file(where: str, file: Mapping[str, Any]) -> ImagePart:
    """An uploaded file as an image part; non-image files (by MIME type or extension) refused."""
    path = file.get("path") or file.get("url")
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"{where}: file entry without a 'path': {dict(file)!r}")
    path = os.fspath(path)
    file_name = file.get("orig_name") or PurePath(urllib.parse.urlparse(path).path).name or path
    mime_type = file.get("mime_type") or mimetypes.guess_type(file_name)[0]
    if mime_type is not None and not mime_type.startswith("image/"):
        raise ValueError(
            f"{where}: {file_name} is not an image ({mime_type}); only image files can be sent"
        )
    return ImagePart(path, name=file_name)


def _gradio_new_message_parts(message: str | Mapping[str, Any]) -> list[Part]:
    """The multimodal textbox value ``{"text", "files"}`` (or a string): files, then text."""
    if isinstance(message, str):
        return [TextPart(message)] if message else []
    value = _as_mapping("message", message, "multimodal message")
    parts: list[Part] = []
    for index, file in enumerate(value.get("files") or []):
        where = f"message.files[{index}]"
        entry = {"path": file} if isinstance(file, str | os.PathLike) else file
        parts.append(_gradio_file(where, _as_mapping(where, entry, "file")))
    if value.get("text"):
        parts.append(_text("message.text", value["text"]))
    return parts
