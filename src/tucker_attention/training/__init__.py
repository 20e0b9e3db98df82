"""Training: run configs, tasks, the shared training loop and run checkpoints."""

from .config import DataConfig, RunConfig, TrainConfig, apply_overrides, load_config_file
from .tasks import LMTask, make_task
from .trainer import lr_factor, param_groups, train

__all__ = ["DataConfig", "LMTask", "RunConfig", "TrainConfig", "apply_overrides", "load_config_file", "lr_factor",
           "make_task", "param_groups", "train"]
