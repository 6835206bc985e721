"""Training: one loop shared by pretraining and later post-training jobs (they differ in batch
source and loss), with checkpoint/resume, MoE balancing, MTP loss, metrics and reports."""

from kinetic.train.config import TrainConfig, load_config
from kinetic.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "load_config"]
