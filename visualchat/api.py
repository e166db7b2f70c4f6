"""The Python API: `VisualChat.from_pretrained()` and `vc.chat()`.

from visualchat import VisualChat
vc = VisualChat.from_pretrained()            # the embedded default, offline
session = vc.chat(system="Be brief.")
session.send("Compare them.", images=["a.png", "b.png"])
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from visualchat.images import ImageLimits
from visualchat.messages import Conversation
from visualchat.model import loading
from visualchat.model.generate import GenerationOutput, generate, max_context, stream_tokens
from visualchat.model.modeling import VisualChatModel
from visualchat.processor import ProcessedInputs, VisualChatProcessor
from visualchat.sampling import SamplingParams
from visualchat.session import ChatSession

logger = logging.getLogger(__name__)


class ImageFeatureCache:
    """digest -> projected image features, least recently used dropped first. An image sent in
    an earlier round (or by another session) is not encoded again."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.num_encoded = 0  # images that went through the vision tower

    def features(self, model: VisualChatModel, inputs: ProcessedInputs) -> torch.Tensor | None:
        """(num_images, num_image_tokens, hidden) for the inputs' images, encoding only new ones."""
        if inputs.pixel_values is None:
            return None
        with self._lock:
            first_index: dict[str, int] = {}
            for i, digest in enumerate(inputs.image_digests):
                first_index.setdefault(digest, i)
            missing = [i for d, i in first_index.items() if d not in self._entries]
            if missing:
                with torch.inference_mode():
                    fresh = model.encode_images(inputs.pixel_values[missing])  # (m, tokens, hidden)
                self.num_encoded += len(missing)
                for i, feats in zip(missing, fresh, strict=True):
                    self._entries[inputs.image_digests[i]] = feats
            for digest in inputs.image_digests:
                self._entries.move_to_end(digest)
            result = torch.stack([self._entries[d] for d in inputs.image_digests])
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return result


class VisualChat:
    """A loaded model with its processor; streams replies with the reference decoder."""

    def __init__(
        self,
        model: VisualChatModel,
        tokenizer: PreTrainedTokenizerBase,
        limits: ImageLimits | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits or ImageLimits()
        self.processor = VisualChatProcessor.for_model(
            model, tokenizer, max_length=max_context(model), limits=self.limits
        )
        self.image_cache = ImageFeatureCache()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        attention: str | None = None,
        limits: ImageLimits | None = None,
    ) -> VisualChat:
        """No path: the embedded default. A path: a saved VisualChat checkpoint folder."""
        options = loading.LoadOptions(device=device, dtype=dtype)
        if path is None:
            model, tokenizer = loading.load_embedded_default(options)
        else:
            model, tokenizer = loading.load_pretrained(path, options)
        if attention is not None:
            model.set_attention(attention)
        return cls(model, tokenizer, limits)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        loading.save_pretrained(self.model, self.tokenizer, path)

    def chat(self, system: str | None = None, params: SamplingParams | None = None) -> ChatSession:
        return ChatSession(self, system=system, params=params)

    def process(self, conversation: Conversation) -> ProcessedInputs:
        return self.processor(conversation, add_generation_prompt=True)

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        """Text deltas of the reply to the conversation (ChatSession's backend protocol)."""
        inputs = self.process(conversation)
        features = self.image_cache.features(self.model, inputs)
        for event in stream_tokens(self.model, self.tokenizer, inputs, params, features):
            if event.delta:
                yield event.delta

    def generate(self, conversation: Conversation, params: SamplingParams) -> GenerationOutput:
        inputs = self.process(conversation)
        features = self.image_cache.features(self.model, inputs)
        return generate(self.model, self.tokenizer, inputs, params, features)
