"""The model a run starts from, LoRA attachment, and which parameters a stage trains.

Parameters fall in three trainable groups, by name: `vision.*`, `projector.*` and the LoRA
tensors of the language model (`language_model.*.lora_*`). Everything else (the backbone) is
frozen for the whole run, which is why checkpoints and the exported delta hold only the groups.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.config import EMBEDDED_INIT, LoraSpec, ModelSpec
from visualchat.model import delta, loading
from visualchat.model.modeling import VisualChatConfig, VisualChatModel
from visualchat.model.projector import ProjectorConfig
from visualchat.model.vision import VisionConfig

logger = logging.getLogger(__name__)


@dataclass
class InitializedModel:
    model: VisualChatModel  # on CPU, in the spec's dtype
    tokenizer: PreTrainedTokenizerBase
    base_backbone: str | None  # what the exported delta names as its base; None: unknown


def group_of(name: str) -> str | None:
    """The trainable group of a parameter name of a VisualChatModel, or None (frozen)."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("projector."):
        return "projector"
    if name.startswith("language_model.") and ".lora_" in name:
        return "lora"
    return None


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 calls a transformers API deprecated in 5.x on every wrap; not our warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def has_lora(model: VisualChatModel) -> bool:
    return hasattr(model.language_model, "peft_config")


def attach_lora(model: VisualChatModel, spec: LoraSpec) -> None:
    """Wrap the language model in a peft LoRA model (once; it stays for the rest of the run)."""
    from peft import LoraConfig, get_peft_model

    if has_lora(model):
        return
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
    )
    try:
        with quiet_peft():
            model.language_model = get_peft_model(model.language_model, config)
    except ValueError as err:
        raise ValueError(
            f"LoRA target_modules {spec.target_modules} do not fit the backbone: {err}"
        ) from err


def set_trainable(model: nn.Module, groups: Iterable[str]) -> dict[str, nn.Parameter]:
    """Only parameters of `groups` require grad; returns them by name."""
    groups = set(groups)
    trainable = {}
    for name, param in model.named_parameters():
        param.requires_grad_(group_of(name) in groups)
        if param.requires_grad:
            trainable[name] = param
    found = {group_of(name) for name in trainable}
    if groups - found:
        raise ValueError(f"nothing to train in group(s) {sorted(groups - found)}")
    return trainable


def named_group_tensors(model: nn.Module, groups: Iterable[str]) -> dict[str, nn.Parameter]:
    groups = set(groups)
    return {n: p for n, p in model.named_parameters() if group_of(n) in groups}


def load_group_tensors(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], groups: Iterable[str], where: str
) -> None:
    """Copy saved tensors into `groups`; the names must match exactly."""
    expected = named_group_tensors(model, groups)
    if set(expected) != set(tensors):
        missing = sorted(set(expected) - set(tensors))[:5]
        unexpected = sorted(set(tensors) - set(expected))[:5]
        raise ValueError(
            f"{where}: its tensors do not match the recipe's model (missing {missing}, "
            f"unexpected {unexpected}); was it written by another recipe?"
        )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def init_model(spec: ModelSpec, seed: int, restoring: Collection[str] = ()) -> InitializedModel:
    """Build the starting model on CPU; vision and projector built fresh are seeded by `seed`.

    restoring: the trainable groups a checkpoint is about to overwrite (resume, export). A
    factory that takes a `restoring` keyword gets them and may skip their initialisation (the
    embedded factory's projector calibration and alignment: ~75 s for nothing otherwise)."""
    options = loading.LoadOptions(device="cpu", dtype=spec.dtype)
    if spec.init == EMBEDDED_INIT:
        backbone, tokenizer = loading.load_backbone(loading.embedded_gguf_path(), options)
        result = InitializedModel(
            loading.build_model(_fresh_config(spec), backbone, seed=seed),
            tokenizer,
            delta.EMBEDDED,
        )
    elif spec.is_factory:
        result = _from_factory(spec, frozenset(restoring))
    else:
        result = _from_path(spec, options, seed)
    if spec.attention is not None:
        result.model.set_attention(spec.attention)
    if spec.base_backbone is not None:
        result.base_backbone = spec.base_backbone
    return result


def _fresh_config(spec: ModelSpec) -> VisualChatConfig:
    """embedded_config() with the recipe's vision / projector / attention overrides."""
    config = loading.embedded_config(spec.attention or "mmca")
    if spec.vision is not None:
        config.vision = VisionConfig(**spec.vision)
    if spec.projector is not None:
        config.projector = ProjectorConfig(**spec.projector)
    return config


def _from_factory(spec: ModelSpec, restoring: frozenset[str]) -> InitializedModel:
    module_name, _, function_name = spec.init.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model.init {spec.init!r}: cannot import the factory: {err}") from err
    kwargs = dict(spec.factory_kwargs)
    if restoring and "restoring" in inspect.signature(factory).parameters:
        kwargs["restoring"] = restoring
    model, tokenizer = factory(**kwargs)
    if not isinstance(model, VisualChatModel):
        raise TypeError(
            f"model.init {spec.init!r} returned a {type(model).__name__}, "
            "expected (VisualChatModel, tokenizer)"
        )
    if spec.base_backbone is None:
        logger.warning(
            "model.init is a factory and model.base_backbone is not set: the exported delta "
            "will not name a loadable base backbone"
        )
    return InitializedModel(model.cpu(), tokenizer, None)


def _from_path(spec: ModelSpec, options: loading.LoadOptions, seed: int) -> InitializedModel:
    path = Path(spec.init).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model.init {spec.init!r}: no such file or folder (expected 'embedded', a .gguf "
            "file, an HF backbone folder, a VisualChat checkpoint or 'module:function')"
        )
    if loading.is_checkpoint(path):
        if spec.vision is not None or spec.projector is not None:
            raise ValueError(
                f"model.init {path} is a VisualChat checkpoint, which brings its own vision "
                "tower and projector; remove model.vision / model.projector"
            )
        if delta.is_delta(path):
            return _from_delta(path, options)
        model, tokenizer = loading.load_pretrained(path, options)
        return InitializedModel(model, tokenizer, str(path.resolve()))
    backbone, tokenizer = loading.load_backbone(path, options)
    model = loading.build_model(_fresh_config(spec), backbone, seed=seed)
    return InitializedModel(model, tokenizer, str(path.resolve()))


def _from_delta(path: Path, options: loading.LoadOptions) -> InitializedModel:
    """Continue a delta checkpoint: its adapter stays a trainable peft adapter (not merged)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    with open(path / loading.CONFIG_NAME) as f:
        payload = json.load(f)
    config = VisualChatConfig.from_dict(payload["visualchat"])
    backbone, tokenizer = delta.load_base_backbone(payload["base_backbone"], options)
    model = VisualChatModel(config, backbone)
    state = load_file(str(path / loading.WEIGHTS_NAME))
    expected = {k for k in model.state_dict() if k.startswith(delta.TRAINED_PREFIXES)}
    if set(state) != expected:
        raise ValueError(f"{path}: the delta's weights do not match its config")
    model.load_state_dict(state, strict=False)
    if (path / delta.ADAPTER_DIR).is_dir():
        with quiet_peft():
            model.language_model = PeftModel.from_pretrained(
                model.language_model, str(path / delta.ADAPTER_DIR), is_trainable=True
            )
    _, dtype = options.resolve()
    return InitializedModel(model.to(dtype=dtype), tokenizer, payload["base_backbone"])
