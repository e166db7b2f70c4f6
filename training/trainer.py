"""The training loop: stages on accelerate (CPU, CUDA, DDP under `accelerate launch`).

Design note. A run is a list of stages trained one after another on one model; each stage
freezes everything but its trainable groups, gets a fresh AdamW and its own warm-up + cosine
schedule, and is wrapped anew by `accelerator.prepare` (DDP only reduces the parameters that
require grad when it is built, so the trainable set must be fixed per wrap). Progress is one
global step counter plus one data position (see training.data), both stored in every
checkpoint together with the RNG states: resuming rebuilds the model from the recipe, loads
the trained tensors and replays nothing, so a resumed run takes the same steps on the same
micro-batches as an uninterrupted one. The loss of an optimiser step is the sum over its
micro-batches divided by the number of label tokens of the whole step on all ranks (one small
all-reduce), so the gradient is a per-token mean that does not depend on how the step is split
into micro-batches or processes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from training.checkpoint import (
    Checkpoint,
    TrainState,
    find_latest,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sweep_incomplete,
)
from training.collator import Collator
from training.config import StageSpec, TrainConfig
from training.data import DataOrder, approximate_lengths, open_blended, plan_micro_batches
from training.fast_step import FrozenBf16, compile_decoder_layers, eager, uncompile_decoder_layers
from training.held_out import HeldOut
from training.model_init import (
    attach_lora,
    has_lora,
    init_model,
    load_group_tensors,
    named_group_tensors,
    set_trainable,
)
from training.optim import build_optimizer, build_scheduler
from training.run_log import LOG_NAME, RunLog
from training.stages import STAGE_KINDS, StageKind
from training.vision_aux import VisionAux
from visualchat.images import ImageLimits
from visualchat.model.modeling import VisualChatModel
from visualchat.processor import VisualChatProcessor

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
MERGED_DIR = "merged"
CHECKPOINTS_DIR = "checkpoints"
# Training data is trusted local data: any number of images per conversation.
TRAINING_IMAGE_LIMITS = ImageLimits(max_images=1_000_000)


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path  # the exported delta (vision + projector + LoRA adapter)
    merged_dir: Path | None  # full checkpoint with LoRA merged, when run.merge
    global_step: int
    train_loss: float | None  # mean loss of the last logged window
    eval: dict[str, Any] | None  # the last eval log record
    model: VisualChatModel = field(repr=False)  # trained, in memory (LoRA still a peft adapter)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)


def use_training_attention(model: VisualChatModel, device: torch.device) -> None:
    """Causal attention trains with transformers' "eager" kernel on CPU instead of SDPA.

    Why: torch's CPU flash-attention backward is slow at these lengths. One training micro-batch
    of the embedded default (8 conversations of ~180 tokens, bf16 autocast, LoRA) takes 3.8 s
    with SDPA and 2.8 s with eager (matmul + float32 softmax + matmul), the same arithmetic in
    another order; benchmarks/training_step.py measures it. On GPUs SDPA's fused kernels are the
    better choice, so only CPU switches; MMCA keeps its own kernel. `_finish` puts the inference
    kernel back.
    """
    if device.type == "cpu" and model.config.attention == "causal":
        model.language_model.set_attn_implementation("eager")


def run_training(config: TrainConfig, resume: bool = True) -> TrainResult:
    """Train every stage of `config`; with resume, continue from output_dir's latest checkpoint."""
    return Trainer(config).run(resume)


@dataclass
class _Window:
    """Running sums between two log lines."""

    loss_sum: torch.Tensor | float = 0.0  # local summed loss
    num_units: int = 0  # global loss units
    num_samples: int = 0  # global
    num_tokens: int = 0  # global
    lr: float = 0.0  # learning rate of the last step
    aux: dict[str, float] = field(default_factory=dict)  # summed vision-aux loss and accuracies
    grad_norms: list[float] = field(default_factory=list)  # pre-clipping norm of each step
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        self.config = config
        self.accelerator = Accelerator(
            mixed_precision="bf16" if config.run.precision == "bf16" else "no",
            # Without CUDA, processes started by torchrun form a gloo (MULTI_CPU) group.
            cpu=not torch.cuda.is_available(),
            # A batch without images leaves vision and projector without gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.is_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.output_dir = config.output_dir
        self.checkpoint_root = self.output_dir / CHECKPOINTS_DIR
        self.log = RunLog(self.output_dir / LOG_NAME, self.accelerator.is_main_process)
        self.stage_starts = [
            sum(s.steps for s in config.stages[:i]) for i in range(len(config.stages))
        ]
        self.last_loss: float | None = None
        self.last_eval: dict[str, Any] | None = None
        self.last_eval_step = -1
        self.frozen_bf16: FrozenBf16 | None = None  # while a stage with frozen_weights_bf16 runs

    # --- the run ---------------------------------------------------------------------------

    def run(self, resume: bool) -> TrainResult:
        from accelerate.utils import set_seed

        acc, config = self.accelerator, self.config
        self.started = time.perf_counter()
        checkpoint = self._find_checkpoint(resume)
        set_seed(config.run.seed)
        # Groups the checkpoint overwrites: the model's factory may skip initialising them.
        restoring = set()
        if checkpoint is not None:
            restoring = config.groups_trained_through(checkpoint.state.stage_index)
        init = init_model(config.model, config.run.seed, restoring)
        self.model, self.tokenizer, self.base_backbone = (
            init.model,
            init.tokenizer,
            init.base_backbone,
        )
        self.had_adapter = has_lora(self.model)
        state = TrainState(0, 0, 0, acc.num_processes)
        if checkpoint is not None:
            state = self._restore(checkpoint)
        self.model.to(acc.device)
        use_training_attention(self.model, acc.device)
        self._open_data()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(config.to_yaml())
            self.log.truncate_after(state.global_step)
        if checkpoint is not None:
            rng = checkpoint.rng
            set_rng_state(rng[acc.process_index % len(rng)])
        self.progress = self._progress_bar(state.global_step)
        if checkpoint is not None and self._is_eval_step(state.global_step):
            self._evaluate(state, self._stage_of(state.global_step))  # cut off by the kill
        for index, stage in enumerate(config.stages):
            if state.global_step >= self.stage_starts[index] + stage.steps:
                continue
            resumed = checkpoint is not None and checkpoint.state.stage_index == index
            optimizer_state = checkpoint.optimizer if resumed else None
            self._train_stage(index, stage, state, optimizer_state)
        self.progress.close()
        if self.held_out and self.last_eval_step != state.global_step:
            self._evaluate(state, self._stage_of(state.global_step))
        return self._finish(state)

    def _find_checkpoint(self, resume: bool) -> Checkpoint | None:
        acc = self.accelerator
        if acc.is_main_process:
            sweep_incomplete(self.checkpoint_root)
        acc.wait_for_everyone()
        latest = find_latest(self.checkpoint_root)
        if latest is None:
            if resume:
                logger.info("no checkpoint in %s: starting from the beginning", self.output_dir)
            return None
        if not resume:
            raise FileExistsError(
                f"{self.output_dir} already holds checkpoints (latest: {latest.name}); resume "
                "the run or choose another run.output_dir"
            )
        checkpoint = load_checkpoint(latest)
        if checkpoint.config_yaml != self.config.to_yaml():
            logger.warning(
                "the recipe differs from the one %s was written with; resuming anyway",
                latest.name,
            )
        logger.info("resuming from %s (step %d)", latest, checkpoint.state.global_step)
        return checkpoint

    def _is_eval_step(self, step: int) -> bool:
        every = self.config.run.eval_every
        return bool(self.held_out) and every > 0 and step > 0 and step % every == 0

    def _stage_of(self, step: int) -> int:
        """The stage whose steps include global step `step` (1-based)."""
        for index, start in enumerate(self.stage_starts):
            if step <= start + self.config.stages[index].steps:
                return index
        return len(self.config.stages) - 1

    def _attach_lora(self) -> None:
        if self.had_adapter and any(s.lora is not None for s in self.config.stages):
            logger.warning("the init already has a LoRA adapter; the recipe's lora block is unused")
        attach_lora(self.model, self.config.lora)

    def _restore(self, checkpoint: Checkpoint) -> TrainState:
        saved = checkpoint.state
        groups = self.config.groups_trained_through(saved.stage_index)
        if "lora" in groups:
            self._attach_lora()
        load_group_tensors(self.model, checkpoint.tensors, groups, where=str(checkpoint.folder))
        if saved.num_processes != self.accelerator.num_processes:
            logger.warning(
                "checkpoint written by %d processes, resuming with %d: the global batch and "
                "so the data order per step change",
                saved.num_processes,
                self.accelerator.num_processes,
            )
        return TrainState(
            saved.global_step,
            saved.stage_index,
            saved.data_position,
            self.accelerator.num_processes,
            saved.num_dropped,
        )

    def _open_data(self) -> None:
        config = self.config
        self.train_data = open_blended(config.data.train)
        self.order = DataOrder(len(self.train_data), config.run.seed)
        self.lengths = None
        if config.data.group_by_length:
            self.lengths = approximate_lengths(self.train_data, self.model.num_image_tokens)
        self.processor = VisualChatProcessor.for_model(
            self.model, self.tokenizer, limits=TRAINING_IMAGE_LIMITS
        )
        records: list[dict[str, Any]] = []
        if config.data.eval is not None and config.run.eval_samples > 0:
            eval_data = open_blended(config.data.eval)
            records = [eval_data[i] for i in range(min(config.run.eval_samples, len(eval_data)))]
        self.held_out = HeldOut(
            records,
            Collator(self.processor, config.data.max_length),
            self.tokenizer,
            TRAINING_IMAGE_LIMITS,
            with_accuracy=config.run.eval_accuracy,
            max_tokens=config.run.eval_max_tokens,
        )

    def _progress_bar(self, initial: int):
        from tqdm.auto import tqdm

        enabled = self.config.run.progress and self.accelerator.is_main_process
        return tqdm(
            total=self.config.total_steps, initial=initial, disable=not enabled, unit="step"
        )

    # --- one stage -------------------------------------------------------------------------

    def _train_stage(
        self,
        index: int,
        stage: StageSpec,
        state: TrainState,
        optimizer_state: dict[str, Any] | None,
    ) -> None:
        acc, config = self.accelerator, self.config
        kind = STAGE_KINDS[stage.kind]
        if "lora" in stage.trainable:
            self._attach_lora()
        trainable = set_trainable(self.model, stage.trainable)
        self.vision_aux = self._vision_aux(stage)
        self._speed_up()
        optimizer = build_optimizer(trainable, stage)
        scheduler = build_scheduler(optimizer, stage)
        if optimizer_state is not None and not self.is_deepspeed:
            optimizer.load_state_dict(optimizer_state["optimizer"])
            scheduler.load_state_dict(optimizer_state["scheduler"])
        self._configure_deepspeed(stage)
        # The scheduler stays unprepared: accelerate would step it once per process.
        wrapped, optimizer = acc.prepare(self.model, optimizer)
        wrapped.train()
        stage_step = state.global_step - self.stage_starts[index]
        plan = plan_micro_batches(
            self.order,
            state.data_position,
            (stage.steps - stage_step) * stage.grad_accum,
            stage.batch_size,
            acc.num_processes,
            acc.process_index,
            lengths=self.lengths,
            grad_accum=stage.grad_accum,
        )
        batches = iter(self._loader(plan, kind))
        self.progress.set_description(stage.name)
        logger.info(
            "stage %s: %s trainable tensors (%d parameters), steps %d..%d",
            stage.name,
            len(trainable),
            sum(p.numel() for p in trainable.values()),
            stage_step + 1,
            stage.steps,
        )
        window = _Window()
        for _ in range(stage_step, stage.steps):
            micro_batches = [next(batches) for _ in range(stage.grad_accum)]
            stats = self._optimizer_step(
                wrapped, optimizer, scheduler, trainable, kind, stage, micro_batches, state
            )
            state.global_step += 1
            state.data_position += stage.batch_size * stage.grad_accum * acc.num_processes
            state.num_dropped += stats["dropped"]
            window.loss_sum = window.loss_sum + stats["loss_sum"]
            window.lr = stats["lr"]
            for key in ("num_units", "num_samples", "num_tokens"):
                setattr(window, key, getattr(window, key) + stats[key])
            for key, value in stats["aux"].items():
                window.aux[key] = window.aux.get(key, 0.0) + value
            if stats["grad_norm"] is not None:
                window.grad_norms.append(stats["grad_norm"])
            self.progress.update(1)
            is_stage_end = state.global_step == self.stage_starts[index] + stage.steps
            if state.global_step % config.run.log_every == 0 or is_stage_end:
                self._log_train(state, stage, window)
                window = _Window()
            save_every = config.run.save_every
            if is_stage_end or (save_every and state.global_step % save_every == 0):
                self._save(state, index, optimizer, scheduler)
            if self._is_eval_step(state.global_step):
                self._evaluate(state, index)
        if self.frozen_bf16 is not None:  # the next stage may freeze other weights
            self.frozen_bf16.restore()
            self.frozen_bf16 = None
        # Drop this stage's DDP wrapper and optimizer before the next stage wraps the model.
        del wrapped, optimizer, batches
        acc.free_memory()

    def _speed_up(self) -> None:
        """run.frozen_weights_bf16 and run.compile (training.fast_step), for this stage."""
        run = self.config.run
        if run.frozen_weights_bf16:
            self.frozen_bf16 = FrozenBf16(self.model.language_model)
            self.frozen_bf16.apply()
        if run.compile:
            if self.accelerator.num_processes > 1:
                raise NotImplementedError("run.compile is built and tested for one process only")
            count = compile_decoder_layers(self.model.language_model)
            logger.info("%d decoder layers compiled (the first micro-batch compiles them)", count)

    def _vision_aux(self, stage: StageSpec) -> VisionAux | None:
        if stage.vision_aux is None:
            return None
        if self.accelerator.num_processes > 1:
            # Its loss runs the tower outside the DDP wrapper; not built or tested for that.
            raise NotImplementedError("vision_aux trains in a single process only")
        return VisionAux.prepare(
            self.model.vision,
            stage.vision_aux,
            self.config.run.seed,
            self.config.run.precision,
            self.output_dir,
        )

    def _loader(self, plan: list[list[int]], kind: StageKind):
        from torch.utils.data import DataLoader

        # A private generator: creating the loader must not draw from the global RNG, or a
        # resumed run (which creates it at another step) would diverge from an unbroken one.
        generator = torch.Generator().manual_seed(self.config.run.seed)
        return DataLoader(
            self.train_data,
            batch_sampler=plan,
            collate_fn=kind.make_collator(self.processor, self.config.data.max_length),
            num_workers=self.config.run.num_workers,
            generator=generator,
        )

    def _configure_deepspeed(self, stage: StageSpec) -> None:
        """DeepSpeed reads micro-batch size and accumulation from its config at prepare time;
        stages differ, so fill them per stage (we never hand it a dataloader)."""
        if not self.is_deepspeed:
            return
        ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = stage.batch_size
        ds_config["gradient_accumulation_steps"] = stage.grad_accum
        ds_config["train_batch_size"] = (
            stage.batch_size * stage.grad_accum * self.accelerator.num_processes
        )
        self.accelerator.gradient_accumulation_steps = stage.grad_accum

    def _optimizer_step(
        self,
        wrapped: torch.nn.Module,
        optimizer: Any,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        trainable: dict[str, torch.nn.Parameter],
        kind: StageKind,
        stage: StageSpec,
        micro_batches: list[Any],
        state: TrainState,
    ) -> dict[str, Any]:
        acc = self.accelerator
        local = torch.tensor(
            [
                sum(kind.num_units(b) for b in micro_batches),
                sum(b.num_samples for b in micro_batches),
                sum(b.num_tokens for b in micro_batches),
                sum(b.num_dropped for b in micro_batches),
            ],
            dtype=torch.float64,
            device=acc.device,
        )
        num_units, num_samples, num_tokens, num_dropped = acc.reduce(local, "sum").tolist()
        # DDP (and DeepSpeed) average gradients over ranks; DeepSpeed also divides by the
        # accumulation steps. Undo both so the step's gradient is the global per-unit mean.
        scale = acc.num_processes / max(num_units, 1.0)
        if self.is_deepspeed:
            scale *= stage.grad_accum
        aux: dict[str, float] = {}
        if self.vision_aux is not None:
            # Scenes of this step (seeded by its number), the tower only: stage 0's loss.
            aux_loss, accuracies = self.vision_aux.loss(self.model.vision, state.global_step)
            acc.backward(aux_loss * stage.vision_aux.weight)
            aux = {"aux_loss": float(aux_loss.detach()), "aux_steps": 1.0, **accuracies}
        loss_sum = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro_batches):
            is_last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if is_last else acc.no_sync(wrapped):
                loss = kind.loss(wrapped, batch.to(acc.device))
                acc.backward(loss * scale)
            loss_sum += loss.detach().float()
        grad_norm = None
        if stage.max_grad_norm > 0:
            # The norm before clipping, logged so a run shows how often clipping acts (AdamW
            # undoes a constant scale, but not one that changes from step to step).
            norm = acc.clip_grad_norm_(list(trainable.values()), stage.max_grad_norm)
            grad_norm = None if norm is None else float(norm)  # DeepSpeed clips inside
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {
            "loss_sum": loss_sum,
            "num_units": int(num_units),
            "num_samples": int(num_samples),
            "num_tokens": int(num_tokens),
            "dropped": int(num_dropped),
            "lr": lr,
            "aux": aux,
            "grad_norm": grad_norm,
        }

    # --- logging, checkpoints, evaluation ---------------------------------------------------

    def _log_train(
        self,
        state: TrainState,
        stage: StageSpec,
        window: _Window,
    ) -> None:
        loss_sum = self.accelerator.reduce(
            torch.as_tensor(window.loss_sum, device=self.accelerator.device).clone(), "sum"
        )
        loss = float(loss_sum) / max(window.num_units, 1)
        seconds = max(time.perf_counter() - window.started, 1e-9)
        record = {
            "type": "train",
            "step": state.global_step,
            "stage": stage.name,
            "loss": loss,
            "lr": window.lr,
            "samples_per_s": window.num_samples / seconds,
            "tokens_per_s": window.num_tokens / seconds,
            "elapsed": time.perf_counter() - self.started,
            "dropped": state.num_dropped,
        }
        if window.grad_norms:  # before clipping; a step is clipped when it exceeds max_grad_norm
            norms = window.grad_norms
            record["grad_norm"] = sum(norms) / len(norms)
            record["grad_norm_max"] = max(norms)
            record["clipped_fraction"] = sum(n > stage.max_grad_norm for n in norms) / len(norms)
        steps = window.aux.get("aux_steps", 0.0)
        if steps:  # the vision-aux loss and read-out accuracies, means over the window
            record["vision_aux"] = {
                key: value / steps for key, value in window.aux.items() if key != "aux_steps"
            }
        self.last_loss = loss
        self.log.write(record)
        self.progress.set_postfix(
            loss=f"{loss:.4f}",
            samples_s=f"{record['samples_per_s']:.1f}",
            tokens_s=f"{record['tokens_per_s']:.0f}",
        )
        logger.debug("%s", record)

    def _save(self, state: TrainState, stage_index: int, optimizer: Any, scheduler: Any) -> None:
        from accelerate.utils import gather_object

        acc = self.accelerator
        rng = gather_object([rng_state()])  # one entry per rank, in rank order
        if acc.is_main_process:
            tensors = named_group_tensors(
                self.model, self.config.groups_trained_through(stage_index)
            )
            # ZeRO partitions optimizer state across ranks; it is not part of our checkpoint.
            optimizer_state = (
                None
                if self.is_deepspeed
                else {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            )
            saved = TrainState(
                state.global_step,
                stage_index,
                state.data_position,
                acc.num_processes,
                state.num_dropped,
            )
            save_checkpoint(
                self.checkpoint_root,
                saved,
                tensors,
                optimizer_state,
                rng,
                self.config.to_yaml(),
                self.config.run.keep_checkpoints,
            )
        acc.wait_for_everyone()

    def _evaluate(self, state: TrainState, stage_index: int) -> None:
        stage = self.config.stages[stage_index]
        # Evaluation and generation see the float32 weights and run eagerly (training.fast_step).
        full_precision = (
            self.frozen_bf16.full_precision()
            if self.frozen_bf16 is not None
            else contextlib.nullcontext()
        )
        with full_precision, eager():
            result = self.held_out.evaluate(self.model, self.accelerator, stage.batch_size)
        record = {"type": "eval", "step": state.global_step, "stage": stage.name, **result}
        self.log.write(record)
        self.last_eval, self.last_eval_step = record, state.global_step

    # --- export -----------------------------------------------------------------------------

    def _finish(self, state: TrainState) -> TrainResult:
        from training.export import export_merged
        from visualchat.model.delta import save_delta

        acc, config = self.accelerator, self.config
        self.model.set_attention(self.model.config.attention)  # the inference kernel again
        if config.run.compile:
            uncompile_decoder_layers(self.model.language_model)  # callers generate with it
        final = self.output_dir / FINAL_DIR
        merged = self.output_dir / MERGED_DIR if config.run.merge else None
        if acc.is_main_process:
            base = self.base_backbone or config.model.init
            save_delta(self.model, final, base_backbone=base)
            if merged is not None:
                export_merged(final, merged)
            if state.num_dropped:
                logger.warning("%d over-long samples were dropped in all", state.num_dropped)
        acc.wait_for_everyone()
        return TrainResult(
            output_dir=self.output_dir,
            final_dir=final,
            merged_dir=merged,
            global_step=state.global_step,
            train_loss=self.last_loss,
            eval=self.last_eval,
            model=self.model,
            tokenizer=self.tokenizer,
        )
