"""Quality and speed measures for quantized models: perplexity on a fixed offline English text,
decode speed of the reference decoder.

The text is Python's own documentation of its statements and operators, the `pydoc_data.topics`
module of the standard library: English prose that ships with every Python and needs no
download. Its exact wording changes between Python releases, so results carry the Python
version and a digest of the scored token ids.
"""

from __future__ import annotations

import hashlib
import platform
import time

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from visualchat.messages import Conversation
from visualchat.model.generate import stream_tokens
from visualchat.model.modeling import VisualChatModel
from visualchat.processor import VisualChatProcessor
from visualchat.sampling import SamplingParams

TEXT_SOURCE = f"pydoc_data.topics (Python {platform.python_version()} standard library)"
DECODE_PROMPT = "Write a long story about a lighthouse keeper."


def reference_text() -> str:
    """The topics of pydoc_data.topics, in the module's order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def reference_token_ids(tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> torch.Tensor:
    """(n,) the first max_tokens token ids of the reference text (no special tokens)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    text = reference_text()
    # Tokenize a prefix that surely holds max_tokens tokens (>= 1 char per token), not all of it.
    ids = tokenizer(text[: 8 * max_tokens], add_special_tokens=False)["input_ids"]
    if len(ids) < max_tokens:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def token_digest(token_ids: torch.Tensor) -> str:
    return hashlib.sha256(token_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


@torch.inference_mode()
def perplexity(
    model: VisualChatModel,
    token_ids: torch.Tensor,  # (n,)
    window: int = 512,
    stride: int = 512,
) -> float:
    """exp(mean NLL) over windows of `window` tokens moved by `stride`. Each token is scored at
    most once, in the first window that holds it after at least one token of context; with
    stride == window (disjoint windows) the first token of every window goes unscored."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
    num_tokens = token_ids.numel()
    total_nll = 0.0
    num_scored = 0
    scored_until = 1  # tokens before this absolute index are scored (token 0 never is)
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + window, num_tokens)
        ids = token_ids[begin:end].to(model.device).unsqueeze(0)  # (1, len)
        logits = model(ids, torch.zeros_like(ids)).logits[0].float()  # (len, vocab)
        nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")  # (len - 1,)
        new = end - max(scored_until, begin + 1)  # targets not scored by an earlier window
        if new > 0:
            total_nll += float(nll[-new:].sum())
            num_scored += new
            scored_until = end
        if end == num_tokens:
            break
    return float(torch.tensor(total_nll / num_scored).exp())


@torch.inference_mode()
def decode_tokens_per_second(
    model: VisualChatModel, tokenizer: PreTrainedTokenizerBase, num_tokens: int = 32
) -> float:
    """Greedy decode speed of the reference decoder on a text prompt, prefill excluded:
    (num_tokens - 1) tokens over the time between the first and the last token."""
    if num_tokens < 2:
        raise ValueError(f"num_tokens must be at least 2, got {num_tokens}")
    processor = VisualChatProcessor.for_model(model, tokenizer)
    conversation = Conversation()
    conversation.add_user(DECODE_PROMPT)
    inputs = processor(conversation, add_generation_prompt=True)
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True)
    times = [time.perf_counter() for _ in stream_tokens(model, tokenizer, inputs, params)]
    return (len(times) - 1) / (times[-1] - times[0])
