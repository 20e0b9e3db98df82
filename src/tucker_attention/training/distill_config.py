"""The settings of a distillation run (:class:`DistillConfig`, the fields of ``tucker-attn distill``'s
flags). Kept apart from the loop (:mod:`tucker_attention.hf.distill`) so that the command line can
be built without transformers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._fields import check_fields, typed
from .config import PRECISIONS

PARAMS = ("attention", "all")     # which parameters train: the converted attention blocks, or every one

# fields added after runs were written without them, at the values those runs trained with
LATER_FIELDS = {"lr_rule": "uniform"}


@dataclass
class DistillConfig:
    """One distillation run. ``layer_steps`` / ``steps``: optimizer steps of the per-layer and
    end-to-end phases (either may be 0), each AdamW with linear warmup (``warmup_steps``) and
    cosine decay to ``min_lr_ratio`` × its peak (``layer_lr``, ``lr``; per parameter times
    :func:`lr_scales` of ``lr_rule``). A step trains on
    ``batch_size`` × ``grad_accum_steps`` windows of ``seq_len`` tokens (``batch_size`` is global:
    split across DDP processes). ``eval_windows`` held-out windows are measured every
    ``eval_interval`` steps; a checkpoint is written every ``checkpoint_interval`` steps and at
    the end of each phase. ``activation_checkpointing``: the student's blocks keep no activations
    for the backward pass and recompute them in it (less memory, about one more forward of time;
    the same result), through transformers' gradient checkpointing."""

    layer_steps: int = typed(100, low=0)
    steps: int = typed(200, low=0)
    batch_size: int = typed(8, low=1)
    grad_accum_steps: int = typed(1, low=1)
    seq_len: int = typed(256, low=2)
    layer_lr: float = typed(1e-3, low=0, low_open=True)
    lr: float = typed(2e-4, low=0, low_open=True)
    warmup_steps: int = typed(10, low=0)
    min_lr_ratio: float = typed(0.1, low=0, high=1)
    weight_decay: float = typed(0.0, low=0)
    grad_clip: float = typed(1.0, low=0)
    params: str = typed("attention", choices=PARAMS)
    lr_rule: str = typed("uniform", choices=("uniform", "relative"))
    eval_windows: int = typed(16, low=1)
    eval_interval: int = typed(50, low=1)
    checkpoint_interval: int = typed(50, low=1)
    keep_checkpoints: int = typed(2, low=1)
    seed: int = typed(0, low=0, high=2**63 - 1)
    device: str = "auto"
    precision: str = typed("auto", choices=PRECISIONS)
    max_bad_steps: int = typed(0, low=0)
    activation_checkpointing: bool = False
    progress: bool = True

    def __post_init__(self):
        check_fields(self, "distill")
        if self.layer_steps + self.steps == 0:
            raise ValueError("distill: layer_steps and steps are both 0; give at least one step")

    def fixed(self) -> dict:
        """What a resumed run must share with the run it continues (all but the step counts of
        the last phase, the progress bar and activation checkpointing, which changes no result)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("steps", "progress", "activation_checkpointing")}
