"""Render a Conversation with the backbone's chat template into typed text segments.

Design note. The backbone's own chat template (a Jinja string in its tokenizer) decides how
turns are wrapped; we never hand-write a model's prompt format. Images are written into user
turns as `Image {k}: <marker>` where they stand, k counting across the whole conversation, and
the marker is later expanded to the image's run of placeholder tokens. To find the assistant
replies (the only tokens trained), each reply is located by rendering the conversation up to
the reply's turn with and without it: chat templates are prefix-stable, and this is checked,
so a template that is not fails loudly instead of mislabelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from visualchat.messages import Conversation, ImagePart, TextPart

# A private-use character never produced by tokenizers' normal text; user text is scrubbed of it.
IMAGE_MARKER = "\ue000"

# Used only when a backbone ships no chat template (tiny test models, base LMs): ChatML.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SegmentKind = Literal["text", "image", "reply"]


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind  # text: prompt text; image: one image slot; reply: trained assistant text
    text: str = ""  # the text of text/reply segments
    image_index: int = -1  # 0-based across the conversation, for image segments


def render_message_content(parts: list[TextPart | ImagePart], first_image_number: int) -> str:
    """User-turn text with each image written as `Image k: <marker>` where the user put it."""
    pieces: list[str] = []
    number = first_image_number
    for part in parts:
        if isinstance(part, ImagePart):
            pieces.append(f"Image {number}: {IMAGE_MARKER}")
            number += 1
        else:
            text = part.text.replace(IMAGE_MARKER, "")
            if text:
                pieces.append(text)
    return "\n".join(pieces)


class ChatTemplate:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, default_system: str | None = None
    ) -> None:
        """default_system: the system message put first when a conversation has none (an empty
        string renders an empty system turn); None leaves that to the chat template."""
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.chat_template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
        self.end_of_turn = tokenizer.eos_token or ""

    def _as_plain_messages(self, conversation: Conversation) -> list[dict[str, str]]:
        plain = []
        if self.default_system is not None and conversation.system is None:
            plain.append({"role": "system", "content": self.default_system})
        number = 1
        for message in conversation.messages:
            content = render_message_content(message.parts, number)
            number += len(message.images)
            plain.append({"role": message.role, "content": content})
        return plain

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def render(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        return self._render(self._as_plain_messages(conversation), add_generation_prompt)

    def segments(
        self, conversation: Conversation, add_generation_prompt: bool = True
    ) -> list[Segment]:
        """The rendered prompt as text, image and reply segments, in order."""
        messages = self._as_plain_messages(conversation)
        full = self._render(messages, add_generation_prompt)
        reply_spans = self._reply_spans(messages, full)
        segments: list[Segment] = []
        cursor = 0
        for start, end in reply_spans:
            segments += self._split_images(full[cursor:start])
            segments.append(Segment("reply", full[start:end]))
            cursor = end
        segments += self._split_images(full[cursor:])
        return self._number_images(segments)

    def _reply_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ValueError(
                    "the backbone's chat template is not prefix-stable, so assistant replies "
                    "cannot be located for label masking"
                )
            # The reply as the template wrote it (templates may trim or escape the content),
            # through its end-of-turn token, which is trained so the model learns to stop; what
            # follows that token (a newline, say) is not.
            start, end = len(before), len(through)
            if self.end_of_turn:
                eot = through.rfind(self.end_of_turn, start)
                if eot != -1:
                    end = eot + len(self.end_of_turn)
            spans.append((start, end))
        return spans

    @staticmethod
    def _split_images(text: str) -> list[Segment]:
        segments = []
        for i, piece in enumerate(text.split(IMAGE_MARKER)):
            if i:
                segments.append(Segment("image"))
            if piece:
                segments.append(Segment("text", piece))
        return segments

    @staticmethod
    def _number_images(segments: list[Segment]) -> list[Segment]:
        numbered, index = [], 0
        for segment in segments:
            if segment.kind == "image":
                segment = Segment("image", image_index=index)
                index += 1
            numbered.append(segment)
        return numbered
