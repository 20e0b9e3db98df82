"""The non-finite guard shared by training, fine-tuning and distillation: a step whose loss or
gradient norm is NaN/inf is never applied; after ``max_bad_steps`` such steps the run stops."""

from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """A run stopped because a loss, gradient norm, weight or state value was NaN or infinite."""


def first_non_finite(tree, prefix: str = "") -> str | None:
    """The name of the first floating tensor in a (nested) dict/list holding a NaN/inf, or None
    (plain numbers are bookkeeping and not checked)."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and tree.numel():
            low, high = torch.aminmax(tree.detach())  # NaN propagates; 25x faster than isfinite().all()
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                return repr(prefix or "tensor")
        return None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


class NonFiniteGuard:
    """Decides, step by step, whether a step's update may be applied.

    ``check(step, loss=..., grad_norm=...)`` returns True when every value is finite and False
    when the step must be skipped (its gradients dropped); it raises :class:`NonFiniteError`
    naming the step and the quantity once more than ``max_bad_steps`` steps were bad in the run.
    ``bad_steps`` is part of a run's resumable state.
    """

    def __init__(self, max_bad_steps: int = 0, *, setting: str = "train.max_bad_steps", bad_steps: int = 0):
        self.max_bad_steps, self.setting, self.bad_steps = max_bad_steps, setting, bad_steps

    def check(self, step: int, **values) -> bool:
        bad = {name: v for name, v in values.items() if v is not None and not math.isfinite(v)}
        if not bad:
            return True
        self.bad_steps += 1
        what = ", ".join(f"{name} {v}" for name, v in bad.items())
        if self.bad_steps > self.max_bad_steps:
            raise NonFiniteError(f"non-finite {what} at step {step}; stopped after {self.bad_steps} bad step(s) "
                                 f"({self.setting}={self.max_bad_steps} may be skipped). Lower the learning rate "
                                 f"or check the data, then resume from the newest checkpoint")
        return False

    @staticmethod
    def values(*tensors: torch.Tensor | None) -> list[float | None]:
        """Python floats of scalar tensors in one device sync (None stays None)."""
        given = [t.detach().float().reshape(()) for t in tensors if t is not None]
        got = iter(torch.stack(given).tolist()) if given else iter(())
        return [None if t is None else next(got) for t in tensors]
