"""Training: config, optimizer and schedule, checkpoints, data parallelism, metrics, and the loop."""

from fastlm.train.checkpoint import CheckpointDir, load_checkpoint
from fastlm.train.config import ConfigError, TrainConfig
from fastlm.train.distributed import World, close_world, init_world
from fastlm.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

__all__ = [
    "CheckpointDir", "ConfigError", "TrainConfig", "Trainer", "TrainingDiverged", "TrainingInterrupted", "World",
    "close_world", "init_world", "load_checkpoint",
]
