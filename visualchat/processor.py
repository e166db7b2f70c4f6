"""Conversation -> ProcessedInputs: token ids with one placeholder run per image, the modality
tags MMCA reads, image spans, pixel tensors and (for training) labels."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from visualchat.images import (
    ImageLimits,
    check_image_count,
    describe_source,
    image_digest,
    load_image,
)
from visualchat.messages import Conversation
from visualchat.model.attention import TEXT
from visualchat.template import ChatTemplate

if TYPE_CHECKING:
    from visualchat.model.modeling import VisualChatModel

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of every token that is not trained


class ContextLengthError(ValueError):
    """The conversation does not fit the model's context."""


@dataclass(frozen=True)
class ImageSpan:
    start: int  # position of the image's first placeholder token
    length: int  # number of placeholder tokens (the projector's tokens per image)
    image_index: int  # 0-based across the conversation ("Image 1" is 0)


@dataclass
class ProcessedInputs:
    input_ids: torch.Tensor  # (seq,) long; image spans hold the placeholder id
    token_modality: torch.Tensor  # (seq,) long; 0 text, k >= 1 the k-th image
    image_spans: list[ImageSpan]  # one per image, in order
    pixel_values: torch.Tensor | None  # (num_images, 3, H, W) or None without images
    image_digests: list[str] = field(default_factory=list)  # sha256 per image, encode-once key
    labels: torch.Tensor | None = None  # (seq,) IGNORE_INDEX outside assistant replies

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        return len(self.image_spans)


class VisualChatProcessor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Image.Image], torch.Tensor],
        num_image_tokens: int,
        image_token_id: int = 0,
        max_length: int | None = None,  # the backbone's context, prompt plus reply
        limits: ImageLimits | None = None,
        default_system: str | None = None,  # see VisualChatConfig.default_system
    ) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer, default_system=default_system)
        self.image_transform = image_transform
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.limits = limits or ImageLimits()

    @classmethod
    def for_model(
        cls,
        model: VisualChatModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        limits: ImageLimits | None = None,
    ) -> VisualChatProcessor:
        """The processor a model reads: its vision transform, image token count and id."""
        return cls(
            tokenizer,
            model.vision.image_transform(),
            model.num_image_tokens,
            image_token_id=model.config.image_token_id,
            max_length=max_length,
            limits=limits,
            default_system=model.config.default_system,
        )

    def load_images(
        self, conversation: Conversation, limits: ImageLimits | None = None
    ) -> list[Image.Image]:
        limits = limits or self.limits
        parts = conversation.images()
        check_image_count(len(parts), limits)
        # Errors say which image ("Image 2") in the numbering the user sees, and which file.
        return [
            load_image(
                part.image,
                limits,
                name=f"Image {i + 1} ({part.name or describe_source(part.image)})",
            )
            for i, part in enumerate(parts)
        ]

    def __call__(
        self,
        conversation: Conversation,
        add_generation_prompt: bool = True,
        with_labels: bool = False,
        limits: ImageLimits | None = None,
        images: list[Image.Image] | None = None,  # already loaded, in conversation order
    ) -> ProcessedInputs:
        if images is None:
            images = self.load_images(conversation, limits)
        ids: list[int] = []
        modality: list[int] = []
        labels: list[int] = []
        spans: list[ImageSpan] = []
        for segment in self.template.segments(conversation, add_generation_prompt):
            if segment.kind == "image":
                spans.append(ImageSpan(len(ids), self.num_image_tokens, segment.image_index))
                ids += [self.image_token_id] * self.num_image_tokens
                modality += [segment.image_index + 1] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
                continue
            piece = self.tokenizer(segment.text, add_special_tokens=False)["input_ids"]
            ids += piece
            modality += [TEXT] * len(piece)
            labels += piece if segment.kind == "reply" else [IGNORE_INDEX] * len(piece)
        if len(spans) != len(images):
            raise ValueError(f"{len(spans)} image slots in the prompt but {len(images)} images")
        if self.max_length is not None and len(ids) > self.max_length:
            raise ContextLengthError(
                f"the conversation is {len(ids)} tokens ({len(spans)} images x "
                f"{self.num_image_tokens} tokens) but the model's context is {self.max_length}; "
                "start a new chat or send fewer images"
            )
        pixel_values = torch.stack([self.image_transform(im) for im in images]) if images else None
        return ProcessedInputs(
            input_ids=torch.tensor(ids, dtype=torch.long),
            token_modality=torch.tensor(modality, dtype=torch.long),
            image_spans=spans,
            pixel_values=pixel_values,  # (num_images, 3, H, W)
            image_digests=[image_digest(im) for im in images],
            labels=torch.tensor(labels, dtype=torch.long) if with_labels else None,
        )
