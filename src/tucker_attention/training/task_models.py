"""The model side of each task (its model and config classes, and the check of a ``model`` dict), which
:class:`~tucker_attention.training.config.RunConfig` checks before any data is read. The tasks
(:mod:`~tucker_attention.training.tasks`) build on these classes."""

from __future__ import annotations

import torch

from .._fields import check_values
from ..models import GPT, GPTConfig, ViT, ViTConfig
from . import ranks


class TaskModel:
    """A task's model: ``model_cls`` built from a ``config_cls`` made of a ``model`` dict."""

    model_cls: type
    config_cls: type

    @classmethod
    def check_model(cls, model: dict, train) -> None:
        """Refuse an invalid ``model`` dict (``RunConfig.model``) before any data is read or folder
        made: each given key by its field's type and range, then the config (the keys the data
        decides at stand-in values where not given) and the model itself, built on the meta device
        (no memory), so cross-field and layer checks (e.g. Tucker ranks <= d_model) and the
        rank-adaptive budget (``train.rank_budget_*``) are checked too."""
        config = cls.model_config_of({**cls.stand_ins(check_values(cls.config_cls, model, "model")), **model}, train)
        with torch.device("meta"):
            cls.model_cls(config)

    @classmethod
    def model_config_of(cls, model: dict, train):
        """The model config of a complete ``model`` dict; a rank-adaptive run's attention spec gets
        its starting ranks (:func:`~tucker_attention.training.ranks.starting_spec`)."""
        if not ranks.adaptive(train):
            return cls.config_cls(**model)
        base = cls.config_cls(**{**model, "attention": "mha"})   # the shapes, checked
        spec = ranks.starting_spec(model.get("attention", "mha"), train, d_model=base.d_model, n_heads=base.n_heads,
                                   n_layers=base.n_layers, rope=cls.rope(base), bias=base.bias)
        return cls.config_cls(**{**model, "attention": spec})

    @staticmethod
    def rope(config) -> bool:
        """Whether the model's attention layers use their positional RoPE."""
        return False

    @staticmethod
    def stand_ins(model: dict) -> dict:
        """Values of the model keys the data decides, for :meth:`check_model` (defaults fit)."""
        return {}


class LMModel(TaskModel):
    """The ``lm`` task's model: a :class:`GPT`."""

    model_cls, config_cls = GPT, GPTConfig

    @staticmethod
    def rope(config) -> bool:
        return config.positions == "rope"


class VisionModel(TaskModel):
    """The ``vit`` task's model: a :class:`ViT`."""

    model_cls, config_cls = ViT, ViTConfig

    @staticmethod
    def stand_ins(model: dict) -> dict:
        """image_size is decided by the data: stand in one patch when only patch_size is given."""
        return {"image_size": model["patch_size"]} if "patch_size" in model else {}


TASK_MODELS = {"lm": LMModel, "vit": VisionModel}

__all__ = ["TASK_MODELS", "LMModel", "TaskModel", "VisionModel"]
