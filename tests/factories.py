"""Factory helpers for the tests: a tiny offline tokenizer, tiny random backbones, tiny
VisualChat models, images and conversations (transformers' ModelTester / vLLM's make_request)."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from visualchat.api import VisualChat
from visualchat.messages import Conversation, ImagePart, Message, TextPart
from visualchat.model.loading import build_model
from visualchat.model.modeling import VisualChatConfig, VisualChatModel
from visualchat.model.projector import ProjectorConfig
from visualchat.model.vision import VisionConfig

# A copy of visualchat.template.FALLBACK_CHAT_TEMPLATE, so the tests do not read the template
# from the code under test.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML that trims each message, as Llama-3's and Gemma's templates do (`content | trim`).
TRIMMING_TEMPLATE = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | trim)")

PAD, IM_START, IM_END = "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]  # ids 0, 1, 2

# English plus multi-byte text, so that é, 中文 and emoji split across byte-level tokens.
_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Hello world! This is a tiny tokenizer for the tests of a visual chat model.",
    "Image 1: what is in the picture? Compare the two images and describe the colors.",
    "The first image is red, the second image is green and the third one is blue.",
    "user assistant system reply1 reply2 question answer be brief please thanks",
    "héllo café résumé naïve crème brûlée déjà vu",
    "中文 你好 世界 图片 颜色 🙂 😀 🎉 👍",
]

VISION_CONFIG = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
NUM_PATCHES = 16  # (32 / 8) ** 2
VISION_WIDTH = 32


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer)
    return tokenizer.to_str()


@functools.lru_cache(maxsize=8)
def make_tokenizer(with_chat_template: bool | str = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (320 ids) with ChatML special tokens <pad> (0), <|im_start|>
    (1) and <|im_end|> (2, eos). with_chat_template: True for ChatML, False for none, or a
    Jinja template string. Cached: do not mutate the result."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token=PAD,
        eos_token=IM_END,
        extra_special_tokens=[IM_START],
    )
    if with_chat_template is True:
        tokenizer.chat_template = CHATML_TEMPLATE
    elif with_chat_template:
        tokenizer.chat_template = with_chat_template
    return tokenizer


_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "phi3": Phi3Config,
}
ARCHS = tuple(_CONFIGS)


def make_backbone_config(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    tie_word_embeddings: bool = False,
    hidden_size: int = 32,
    num_layers: int = 2,
) -> PretrainedConfig:
    """A fresh config object every call (set_attn_implementation mutates a model's config)."""
    return _CONFIGS[arch](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # large enough that logits differ clearly between positions
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )


def make_backbone(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> PreTrainedModel:
    """A tiny random causal LM (float32, eval mode, sdpa attention)."""
    config = make_backbone_config(tokenizer, arch, tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().eval()


def make_config(
    attention: str = "mmca", projector: str = "mlp", num_latents: int = 4, image_indices: int = 0
) -> VisualChatConfig:
    return VisualChatConfig(
        vision=VisionConfig(custom=dict(VISION_CONFIG)),
        projector=ProjectorConfig(
            type=projector, num_latents=num_latents, depth=1, image_indices=image_indices
        ),
        attention=attention,
    )


def make_model(
    attention: str = "mmca",
    projector: str = "mlp",
    arch: str = "llama",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    with_chat_template: bool | str = True,
    image_indices: int = 0,
) -> tuple[VisualChatModel, PreTrainedTokenizerFast]:
    """A tiny VisualChatModel (custom 16-patch open_clip ViT) and its tokenizer. With
    image_indices > 0 the image-number vectors are random (as if trained), not zero."""
    tokenizer = make_tokenizer(with_chat_template)
    backbone = make_backbone(tokenizer, arch, seed, tie_word_embeddings)
    config = make_config(attention, projector, image_indices=image_indices)
    model = build_model(config, backbone, seed=seed)
    if image_indices:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.projector.image_index.normal_(0.0, 1.0, generator=generator)
    return model, tokenizer


def make_visualchat(**kwargs) -> VisualChat:
    """`VisualChat` over `make_model(**kwargs)`."""
    model, tokenizer = make_model(**kwargs)
    return VisualChat(model, tokenizer)


# --- images and conversations ------------------------------------------------------------------

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def make_image(color: tuple[int, int, int] = RED, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A solid RGB image with a lighter top-left quadrant (so it is not constant)."""
    image = Image.new("RGB", size, color)
    light = tuple(min(255, c + 100) for c in color)
    image.paste(light, (0, 0, size[0] // 2, size[1] // 2))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def user(*parts: str | Image.Image) -> Message:
    """A user message whose str parts are text and whose PIL parts are images, in order."""
    return Message("user", [TextPart(p) if isinstance(p, str) else ImagePart(p) for p in parts])


def make_conversation(
    *turns: Sequence[str | Image.Image] | str, system: str | None = None
) -> Conversation:
    """Alternating user / assistant turns: a user turn is a sequence of text and PIL images
    (or a str), an assistant turn is a str. E.g.
    make_conversation([img1, img2, "compare"], "reply1", ["and now?", img3])."""
    conversation = Conversation()
    if system is not None:
        conversation.add_system(system)
    for i, turn in enumerate(turns):
        if i % 2 == 0:
            conversation.messages.append(user(*([turn] if isinstance(turn, str) else turn)))
        else:
            assert isinstance(turn, str)
            conversation.add_assistant(turn)
    return conversation
