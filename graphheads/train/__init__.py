"""Training: configuration, the trainer, checkpoints and evaluation."""

from graphheads.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from graphheads.train.config import DataConfig, RunConfig, TrainConfig, default_model_config
from graphheads.train.trainer import Trainer, TrainResult, build_data, evaluate, load_run

__all__ = [
    "CheckpointError",
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_data",
    "default_model_config",
    "evaluate",
    "load_checkpoint",
    "load_run",
    "save_checkpoint",
]
