"""The reference decoder: one sequence, whole prompt at once, then one token per step.

Slow and obviously correct on purpose: the serving engine is tested against it token for token.
It uses the backbone's own KV cache (transformers `DynamicCache`) and the shared sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from visualchat.detokenize import IncrementalDecoder
from visualchat.model.attention import TEXT
from visualchat.model.modeling import VisualChatModel
from visualchat.processor import ContextLengthError, ProcessedInputs
from visualchat.sampling import SamplingParams, make_generator, sample_next_token

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationOutput:
    text: str  # the reply, stop strings excluded
    token_ids: list[int] = field(default_factory=list)  # generated ids, eos included if hit
    finish_reason: FinishReason = "length"
    num_prompt_tokens: int = 0


@dataclass
class StreamEvent:
    delta: str  # text newly safe to show (maybe empty)
    token_id: int  # the token just generated
    finish_reason: FinishReason | None = None  # set on the last event


def stop_token_ids(model: VisualChatModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, model.language_model.generation_config.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids


def max_context(model: VisualChatModel) -> int:
    return int(getattr(model.language_model.config, "max_position_embeddings", 1 << 30))


@torch.inference_mode()
def stream_tokens(
    model: VisualChatModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: ProcessedInputs,
    params: SamplingParams,
    image_features: torch.Tensor | None = None,  # (num_images, tokens, hidden), if cached
) -> Iterator[StreamEvent]:
    """Yield one event per generated token; the last one carries the finish reason."""
    context = max_context(model)
    if inputs.num_tokens >= context:
        raise ContextLengthError(
            f"the prompt is {inputs.num_tokens} tokens but the model's context is {context}"
        )
    device = model.device
    stops = set() if params.ignore_eos else stop_token_ids(model, tokenizer)
    generator = make_generator(params)
    decoder = IncrementalDecoder(tokenizer, params.stop)
    if image_features is None and inputs.pixel_values is not None:
        image_features = model.encode_images(inputs.pixel_values)
    input_ids = inputs.input_ids.to(device).unsqueeze(0)  # (1, seq)
    modality = inputs.token_modality.to(device).unsqueeze(0)  # (1, seq), grows by one per step
    cache = DynamicCache(config=model.language_model.config)
    out = model(
        input_ids,
        modality,
        image_features=image_features,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    num_generated = 0
    while True:
        token_id = sample_next_token(out.logits[0, -1], params, generator)
        num_generated += 1
        finish: FinishReason | None = None
        if token_id in stops:
            finish = "stop"
            delta = ""
        else:
            delta = decoder.add(token_id)
            if decoder.is_stopped:
                finish = "stop"
            elif (
                num_generated >= params.max_tokens or input_ids.shape[1] + num_generated >= context
            ):
                finish = "length"
        if finish is not None:
            yield StreamEvent(delta + decoder.flush(), token_id, finish)
            return
        yield StreamEvent(delta, token_id)
        next_ids = torch.tensor([[token_id]], device=device)  # (1, 1)
        modality = torch.cat([modality, modality.new_full((1, 1), TEXT)], dim=1)
        out = model(next_ids, modality, past_key_values=cache, use_cache=True)


def generate(
    model: VisualChatModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: ProcessedInputs,
    params: SamplingParams,
    image_features: torch.Tensor | None = None,
) -> GenerationOutput:
    output = GenerationOutput(text="", num_prompt_tokens=inputs.num_tokens)
    for event in stream_tokens(model, tokenizer, inputs, params, image_features):
        output.text += event.delta
        output.token_ids.append(event.token_id)
        if event.finish_reason is not None:
            output.finish_reason = event.finish_reason
    return output
