"""Training: run configs, tasks, the one training loop (:mod:`.loop`), the trainer and run checkpoints."""

from .config import DataConfig, RunConfig, TrainConfig, apply_overrides, load_config_file
from .loop import lr_factor
from .tasks import LMTask, make_task
from .trainer import param_groups, train

__all__ = ["DataConfig", "LMTask", "RunConfig", "TrainConfig", "apply_overrides", "load_config_file", "lr_factor",
           "make_task", "param_groups", "train"]
