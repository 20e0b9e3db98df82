"""The settings of a distillation run (:class:`DistillConfig`, the fields of ``tucker-attn distill``'s
flags), the distillation losses by name (:func:`register_loss`) and :class:`DistillError`, the
bad-argument error of ``distill``. Kept apart from the loop
(:mod:`tucker_attention.hf.distillation.distill`) so that the command line can be built without
transformers."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .._fields import typed
from ..training.config import OptimConfig

PARAMS = ("attention", "all")     # which parameters train: the converted attention blocks, or every one

_BUILT_IN = "tucker_attention.hf.distillation.losses"
#: the distillation losses by name: a function ``loss(teacher, student, input_ids, blocks)`` -> a
#: scalar (see :func:`register_loss`), or ``"module:function"`` of a built-in one, imported when first
#: used (its module needs transformers; the names do not)
LOSSES: dict[str, Callable | str] = {"block-error": f"{_BUILT_IN}:block_error", "logit-kl": f"{_BUILT_IN}:logit_kl"}

# fields added after runs were written without them, at the values those runs trained with
LATER_FIELDS = {"lr_rule": "uniform", "beta1": 0.9, "beta2": 0.95, "layer_loss": "block-error", "loss": "logit-kl"}


class DistillError(ValueError):
    """A bad argument of :func:`~tucker_attention.hf.distillation.command.distill_folder` (``tucker-attn
    distill``): ``argument`` names it (``original``, ``converted``, ``data``, ``run_dir``, ``seq_len``,
    ``out``, ...)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument, self.message = argument, message


def loss_names() -> tuple[str, ...]:
    """The names :class:`DistillConfig`'s ``layer_loss`` and ``loss`` accept now."""
    return tuple(sorted(LOSSES))


def register_loss(name: str, fn: Callable | None = None):
    """Register ``fn`` as the distillation loss ``name`` (a decorator without ``fn``); returns ``fn``.

    ``fn(teacher, student, input_ids, blocks)``: ``input_ids`` (B, T) a micro-batch of windows,
    ``blocks`` the paths of the student's converted attention blocks; returns a scalar that is a
    mean over the B windows (so DDP's slices and accumulation's micro-batches average to the
    batch's) and reaches the trained parameters. The teacher is frozen; compute its side under
    ``torch.no_grad()``. A name taken by another function is refused.
    """
    if fn is None:
        return lambda f: register_loss(name, f)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a distillation loss needs a name (a non-empty string), got {name!r}")
    known = LOSSES.get(name)
    if known is not None and known is not fn and not (isinstance(known, str) and known == _where(fn)):
        raise ValueError(f"distillation loss {name!r} is already registered; choose another name")
    LOSSES[name] = fn
    return fn


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"


def get_loss(name: str) -> Callable:
    """The function of the registered distillation loss ``name``."""
    if name not in LOSSES:
        raise ValueError(f"distillation loss must be one of {list(loss_names())}, got {name!r}")
    fn = LOSSES[name]
    if isinstance(fn, str):
        module, _, attribute = fn.partition(":")
        fn = LOSSES[name] = getattr(importlib.import_module(module), attribute)
    return fn


@dataclass
class DistillConfig(OptimConfig):
    """One distillation run: the shared optimization section (:class:`~.config.OptimConfig`, at
    distillation's defaults) and its own fields. ``layer_steps`` / ``steps``: optimizer steps of
    the per-layer and end-to-end phases (either may be 0), each AdamW with linear warmup
    (``warmup_steps``) and cosine decay to ``min_lr_ratio`` × its peak (``layer_lr``, ``lr``; per
    parameter times :func:`~tucker_attention.hf.distillation.distill.lr_scales` of ``lr_rule``),
    minimizing its loss (``layer_loss``, ``loss``: names of :data:`LOSSES`). A step trains on
    ``batch_size`` × ``grad_accum_steps`` windows of ``seq_len`` tokens. ``params``: what trains
    (the converted attention blocks, or every parameter). A checkpoint is also written at the
    end of each phase. ``activation_checkpointing``: the student's layers keep no activations for
    the backward pass and recompute them in it (less memory, about one more forward of time; the
    same result)."""

    SECTION = "distill"

    batch_size: int = OptimConfig.default("batch_size", 8)
    lr: float = OptimConfig.default("lr", 2e-4)
    warmup_steps: int = OptimConfig.default("warmup_steps", 10)
    weight_decay: float = OptimConfig.default("weight_decay", 0.0)
    lr_rule: str = OptimConfig.default("lr_rule", "uniform")
    eval_interval: int = OptimConfig.default("eval_interval", 50)
    eval_windows: int = OptimConfig.default("eval_windows", 16)
    checkpoint_interval: int = OptimConfig.default("checkpoint_interval", 50)
    layer_steps: int = typed(100, low=0)
    steps: int = typed(200, low=0)
    seq_len: int = typed(256, low=2)
    layer_lr: float = typed(1e-3, low=0, low_open=True)
    params: str = typed("attention", choices=PARAMS)
    layer_loss: str = typed("block-error", choices=loss_names)
    loss: str = typed("logit-kl", choices=loss_names)
    activation_checkpointing: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.layer_steps + self.steps == 0:
            raise ValueError("distill: layer_steps and steps are both 0; give at least one step")

    def fixed(self) -> dict:
        """What a resumed run must share with the run it continues (all but the step counts of
        the last phase, the progress bar and activation checkpointing, which changes no result)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("steps", "progress", "activation_checkpointing")}
