"""Training recipes: typed dataclasses read from YAML, validated when built.

A recipe has four sections (see `training/recipes/embedded_two_stage.yaml`):

    model:  what to start from (the embedded default, a backbone or checkpoint path, or a
            Python factory) and the attention / vision / projector choices
    data:   the blended dataset folders (data_blend's manifest.json + data/ layout)
    stages: trained one after another; each names what it trains and its optimiser schedule
    run:    output folder, seed, logging, evaluation, checkpoints, precision

Unknown keys are errors (a typo such as `lr_rate` must not silently fall back to a default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

TRAINABLE_GROUPS = ("vision", "projector", "lora")
EMBEDDED_INIT = "embedded"
Precision = Literal["fp32", "bf16"]


def _check_keys(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    missing = [
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    return dict(data)


def _positive_int(value: Any, what: str, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{what} must be {bound} integer, got {value!r}")


def _number(value: Any, what: str, allow_zero: bool = True) -> float:
    """A float from YAML; also a string such as "1e-3", which YAML 1.1 (PyYAML) reads as a
    string because the mantissa lacks a dot."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if bad or value < 0 or (value == 0 and not allow_zero):
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{what} must be {bound} number, got {value!r}")
    return float(value)


@dataclass
class ModelSpec:
    # "embedded" (SmolLM2 + embedded_config()), a .gguf file or HF backbone folder (fresh vision
    # and projector around it), a VisualChat checkpoint folder (full or delta: training
    # continues from it), or "package.module:function" returning (VisualChatModel, tokenizer).
    init: str = EMBEDDED_INIT
    attention: Literal["mmca", "causal"] | None = None  # None keeps the init's choice
    vision: dict[str, Any] | None = None  # VisionConfig fields; only for a fresh vision side
    projector: dict[str, Any] | None = None  # ProjectorConfig fields; only for a fresh side
    dtype: str = "float32"  # weights while training (autocast is run.precision)
    base_backbone: str | None = None  # recorded in the exported delta; None: derived from init
    factory_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword args of a factory

    def __post_init__(self) -> None:
        if not isinstance(self.init, str) or not self.init:
            raise ValueError(
                f"model.init must be 'embedded', a path or 'module:function', got {self.init!r}"
            )
        if self.attention not in (None, "mmca", "causal"):
            raise ValueError(f"model.attention must be 'mmca' or 'causal', got {self.attention!r}")
        for name in ("vision", "projector", "factory_kwargs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"model.{name} must be a mapping, got {type(value).__name__}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.is_factory and (self.vision or self.projector):
            raise ValueError(
                "model.vision / model.projector overrides do not apply to a factory init; "
                "build the model as you want it inside the factory"
            )
        if self.factory_kwargs and not self.is_factory:
            raise ValueError("model.factory_kwargs is only used with a 'module:function' init")

    @property
    def is_factory(self) -> bool:
        # "C:\\..." drive letters and URLs aside, a colon with no path separator names a factory.
        return ":" in self.init and "/" not in self.init and "\\" not in self.init


@dataclass
class DataSpec:
    train: str  # blended dataset folder (manifest.json + data/)
    eval: str | None = None  # held-out folder of the same layout
    max_length: int = 2048  # samples longer than this (in tokens) are dropped and counted
    # Sort each optimiser step's samples by length before splitting them into micro-batches,
    # so a micro-batch pads to a near length. The step's samples (and so its gradient) are the
    # same; only the padding, which costs compute, shrinks. Useful with grad_accum > 1.
    group_by_length: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.train, str | os.PathLike) or not str(self.train):
            raise ValueError("data.train must name a blended dataset folder")
        self.train = str(self.train)
        if self.eval is not None:
            self.eval = str(self.eval)
        _positive_int(self.max_length, "data.max_length")
        if not isinstance(self.group_by_length, bool):
            raise ValueError(
                f"data.group_by_length must be true or false, got {self.group_by_length!r}"
            )


@dataclass
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )

    def __post_init__(self) -> None:
        _positive_int(self.r, "lora.r")
        self.alpha = _number(self.alpha, "lora.alpha")
        self.dropout = _number(self.dropout, "lora.dropout")
        if not self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                "lora.target_modules must be a non-empty list of module names, e.g. "
                "[q_proj, v_proj]"
            )
        self.target_modules = [str(m) for m in self.target_modules]


@dataclass
class VisionAuxSpec:
    """A stage's `vision_aux` block (training.vision_aux): stage 0's dense loss on fresh
    training scenes, added to every optimiser step so tuning the tower keeps what stage 0 taught
    it readable."""

    weight: float = 1.0  # times the dense loss, added to the step's per-token answer loss
    batch_size: int = 16  # fresh scenes per optimiser step
    group_weight: float = 0.5  # group size and region against cover and centre, as in stage 0
    word_probability: float = 0.5  # as in stage 0
    probe_steps: int = 200  # fitting the fixed read-out heads to the starting tower
    probe_batch_size: int = 48
    probe_lr: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("batch_size", "probe_steps", "probe_batch_size"):
            _positive_int(getattr(self, name), f"vision_aux.{name}")
        for name in ("weight", "group_weight", "probe_lr"):
            setattr(self, name, _number(getattr(self, name), f"vision_aux.{name}", False))
        self.word_probability = _number(self.word_probability, "vision_aux.word_probability")
        if self.word_probability > 1:
            raise ValueError(
                f"vision_aux.word_probability must lie in [0, 1], got {self.word_probability}"
            )


@dataclass
class StageSpec:
    name: str
    trainable: list[str]  # subset of vision, projector, lora
    steps: int  # optimiser steps of this stage
    lr: float
    batch_size: int = 8  # samples per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    warmup_steps: int = 0  # linear warm-up, then cosine decay to zero over the stage
    weight_decay: float = 0.0  # AdamW; never applied to biases and norms
    max_grad_norm: float = 1.0  # 0 disables clipping
    kind: str = "lm"  # key of training.stages.STAGE_KINDS
    lora: LoraSpec | None = None  # LoRA shape, used where a stage first trains lora
    # Per-group multipliers of lr, e.g. {vision: 0.1}: a pretrained tower fine-tuned beside a
    # fresh projector and adapters wants a gentler step than they do. Unlisted groups: 1.
    lr_scale: dict[str, float] = field(default_factory=dict)
    # Stage 0's dense loss kept on the tower while this stage tunes it (needs vision trained).
    vision_aux: VisionAuxSpec | None = None

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("every stage needs a non-empty name")
        if isinstance(self.trainable, str) or not self.trainable:
            raise ValueError(
                f"{where}: trainable must be a non-empty list drawn from {list(TRAINABLE_GROUPS)}"
            )
        self.trainable = list(self.trainable)
        bad = sorted(set(self.trainable) - set(TRAINABLE_GROUPS))
        if bad:
            raise ValueError(
                f"{where}: cannot train {bad}; trainable groups are {list(TRAINABLE_GROUPS)}"
            )
        if len(set(self.trainable)) != len(self.trainable):
            raise ValueError(f"{where}: trainable lists a group twice: {self.trainable}")
        _positive_int(self.steps, f"{where}: steps")
        _positive_int(self.batch_size, f"{where}: batch_size")
        _positive_int(self.grad_accum, f"{where}: grad_accum")
        _positive_int(self.warmup_steps, f"{where}: warmup_steps", allow_zero=True)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"{where}: warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})"
            )
        self.lr = _number(self.lr, f"{where}: lr", allow_zero=False)
        self.weight_decay = _number(self.weight_decay, f"{where}: weight_decay")
        self.max_grad_norm = _number(self.max_grad_norm, f"{where}: max_grad_norm")
        if not isinstance(self.lr_scale, dict):
            raise ValueError(f"{where}: lr_scale must map trainable groups to multipliers")
        for group in self.lr_scale:
            if group not in self.trainable:  # a typo would otherwise scale nothing
                raise ValueError(
                    f"{where}: lr_scale names {group!r}, which this stage does not train "
                    f"(trainable: {self.trainable})"
                )
        self.lr_scale = {
            group: _number(scale, f"{where}: lr_scale.{group}", allow_zero=False)
            for group, scale in self.lr_scale.items()
        }
        if isinstance(self.lora, dict):
            self.lora = LoraSpec(**_check_keys(LoraSpec, self.lora, f"{where}: lora"))
        if isinstance(self.vision_aux, dict):
            self.vision_aux = VisionAuxSpec(
                **_check_keys(VisionAuxSpec, self.vision_aux, f"{where}: vision_aux")
            )
        if self.vision_aux is not None and "vision" not in self.trainable:
            raise ValueError(
                f"{where}: vision_aux keeps a tuned tower readable, but this stage does not "
                "train vision"
            )
        if self.lora is not None and "lora" not in self.trainable:
            raise ValueError(
                f"{where}: has a lora block but does not train lora; add 'lora' to trainable "
                "or remove the block"
            )
        from training.stages import STAGE_KINDS

        if self.kind not in STAGE_KINDS:
            raise ValueError(
                f"{where}: unknown kind {self.kind!r}; known kinds are {sorted(STAGE_KINDS)} "
                "(add one with training.stages.register_stage_kind)"
            )


@dataclass
class RunSpec:
    output_dir: str
    seed: int = 0
    log_every: int = 10  # optimiser steps between log lines
    eval_every: int = 0  # optimiser steps between evaluations; 0: only at the end
    eval_samples: int = 64  # held-out records used for the eval loss and accuracy
    eval_accuracy: bool = True  # also generate answers and score exact match (slower)
    eval_max_tokens: int = 32  # generated tokens per answer when scoring
    save_every: int = 0  # optimiser steps between checkpoints; 0: at stage ends only
    keep_checkpoints: int = 2  # most recent checkpoints kept
    precision: Precision = "fp32"  # bf16: autocast (on CPU only where it measurably helps)
    num_workers: int = 0  # DataLoader worker processes per rank
    progress: bool = True  # tqdm bar on the main process
    merge: bool = False  # also write output_dir/merged: LoRA folded into a full checkpoint
    # Cheaper CPU steps, same arithmetic (training.fast_step): the LM's frozen linear weights
    # held in bf16 during steps (needs precision bf16), and its decoder layers torch.compiled.
    frozen_weights_bf16: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str | os.PathLike) or not str(self.output_dir):
            raise ValueError("run.output_dir must name a folder for logs and checkpoints")
        self.output_dir = str(self.output_dir)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"run.seed must be a non-negative integer, got {self.seed!r}")
        _positive_int(self.log_every, "run.log_every")
        _positive_int(self.eval_every, "run.eval_every", allow_zero=True)
        _positive_int(self.eval_samples, "run.eval_samples", allow_zero=True)
        _positive_int(self.eval_max_tokens, "run.eval_max_tokens")
        _positive_int(self.save_every, "run.save_every", allow_zero=True)
        _positive_int(self.keep_checkpoints, "run.keep_checkpoints")
        _positive_int(self.num_workers, "run.num_workers", allow_zero=True)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"run.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.frozen_weights_bf16 and self.precision != "bf16":
            raise ValueError(
                "run.frozen_weights_bf16 needs run.precision: bf16 (it relies on autocast "
                "casting every matmul to bf16 anyway)"
            )


@dataclass
class TrainConfig:
    model: ModelSpec
    data: DataSpec
    stages: list[StageSpec]
    run: RunSpec

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a recipe needs at least one stage under `stages:`")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        # One adapter per run: it is attached where lora is first trained and stays attached.
        lora_blocks = [(stage.name, stage.lora) for stage in self.stages if stage.lora is not None]
        if any(spec != lora_blocks[0][1] for _, spec in lora_blocks):
            raise ValueError(
                "all stages that give a lora block must give the same one (one adapter is "
                f"attached per run and stays attached): {[name for name, _ in lora_blocks]}"
            )

    @property
    def lora(self) -> LoraSpec:
        """The run's LoRA shape: the one stage block given, or the defaults."""
        return next((s.lora for s in self.stages if s.lora is not None), LoraSpec())

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def groups_trained_through(self, stage_index: int) -> set[str]:
        """Every group trained by stages 0..stage_index: what a checkpoint then must hold."""
        return {g for stage in self.stages[: stage_index + 1] for g in stage.trainable}

    @classmethod
    def from_dict(cls, data: Any) -> TrainConfig:
        data = _check_keys(cls, data, "recipe")
        stages = data["stages"]
        if not isinstance(stages, list):
            raise ValueError("recipe: `stages` must be a list of stages")
        return cls(
            model=ModelSpec(**_check_keys(ModelSpec, data.get("model") or {}, "model")),
            data=DataSpec(**_check_keys(DataSpec, data["data"], "data")),
            stages=[
                StageSpec(**_check_keys(StageSpec, stage, f"stages[{i}]"))
                for i, stage in enumerate(stages)
            ],
            run=RunSpec(**_check_keys(RunSpec, data["run"], "run")),
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
        """Read a recipe; `overrides` are "dotted.key=yaml-value" strings applied first, e.g.
        "model.attention=causal" or "stages.0.steps=60" (list items by index)."""
        with open(path) as f:
            data = yaml.safe_load(f)
        try:
            for override in overrides:
                apply_override(data, override)
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_override(data: Any, override: str) -> None:
    """Set one "a.b.0.c=value" in a nested recipe dict in place (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"override {override!r} must look like section.key=value")
    node = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {override!r}: {where} is not an index of the list")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ValueError(f"override {override!r}: {where} is not a section")
    last = parts[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"override {override!r}: {last} is not an index of the list")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"override {override!r}: {key} is not inside a section")
