"""Training for VisualChat: recipes (YAML) -> stages on accelerate -> delta checkpoints.

    from training import TrainConfig, run_training
    result = run_training(TrainConfig.from_yaml("training/recipes/embedded_two_stage.yaml"))

Multi-process: `accelerate launch --num_processes N -m training.main recipe.yaml`.
"""

from training.config import TrainConfig
from training.evaluate import EvalReport, evaluate_checkpoint
from training.export import export_merged
from training.stages import STAGE_KINDS, StageKind, register_stage_kind
from training.trainer import TrainResult, run_training

__all__ = [
    "STAGE_KINDS",
    "EvalReport",
    "StageKind",
    "TrainConfig",
    "TrainResult",
    "evaluate_checkpoint",
    "export_merged",
    "register_stage_kind",
    "run_training",
]
