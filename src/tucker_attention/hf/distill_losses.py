"""What a distillation run (:mod:`.distill`) minimizes and checks: the per-layer loss (each
converted block against the original block on the original's own block inputs), the end-to-end
next-token KL, the per-block held-out errors, which parameters train, and whether a converted
model belongs to an original.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..training.distill_config import PARAMS


def _block_io(teacher: nn.Module, paths: list[str], input_ids: torch.Tensor) -> dict:
    """{path: (args, kwargs, output)} of the original's attention modules at ``paths`` on ``input_ids``."""
    caught = {}

    def hook(path, module, args, kwargs, output):
        caught[path] = (args, kwargs, output[0] if isinstance(output, tuple) else output)

    handles = [teacher.get_submodule(p).register_forward_hook(functools.partial(hook, p), with_kwargs=True)
               for p in paths]
    try:
        with torch.no_grad():
            teacher(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return caught


def _relative_errors(student: nn.Module, caught: dict) -> dict[str, torch.Tensor]:
    """{path: (B,) ||y_student - y||² / ||y||² per window} of each converted block on the original
    block's inputs (B, T, d)."""
    errors = {}
    for path, (args, kwargs, target) in caught.items():
        out = student.get_submodule(path)(*args, **kwargs)
        out = (out[0] if isinstance(out, tuple) else out).float()
        target = target.float()
        errors[path] = (out - target).pow(2).sum((1, 2)) / target.pow(2).sum((1, 2)).clamp_min(1e-30)
    return errors


def layer_loss(teacher: nn.Module, student: nn.Module, paths: list[str], input_ids: torch.Tensor) -> torch.Tensor:
    """Per-layer matching: the mean over blocks and windows of the relative squared output error
    (a mean over windows, so DDP's slices and accumulation's micro-batches average to it)."""
    errors = _relative_errors(student, _block_io(teacher, paths, input_ids))
    return torch.stack(list(errors.values())).mean()


def logit_kl(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """End-to-end: KL(original ‖ converted) of the next-token distributions, mean over positions."""
    with torch.no_grad():
        target = teacher(input_ids=input_ids, use_cache=False).logits.float().log_softmax(-1)
    got = student(input_ids=input_ids, use_cache=False).logits.float().log_softmax(-1)
    return F.kl_div(got.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")


@torch.no_grad()
def block_errors(teacher: nn.Module, student: nn.Module, batches: list[dict]) -> dict[str, float]:
    """{block path: relative squared output error} of every converted block on the original's
    block inputs of ``batches`` (summed over the batches before the ratio)."""
    from .convert import converted_blocks

    paths = list(converted_blocks(student))
    num, den = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0)
    for batch in batches:
        caught = _block_io(teacher, paths, batch["input_ids"])
        for path, (args, kwargs, target) in caught.items():
            out = student.get_submodule(path)(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            num[path] += float((out.double() - target.double()).pow(2).sum())
            den[path] += float(target.double().pow(2).sum())
    return {p: num[p] / max(den[p], 1e-300) for p in paths}



def trained_modules(student: nn.Module, params: str) -> nn.Module:
    """The module whose parameters train (and whose state a checkpoint holds): the converted
    blocks (``"attention"``, gathered in a ModuleDict keyed by path with ``/`` for ``.``) or the
    whole model (``"all"``)."""
    from .convert import converted_blocks

    if params not in PARAMS:
        raise ValueError(f"params must be one of {PARAMS}, got {params!r}")
    if params == "all":
        return student
    blocks = converted_blocks(student)
    if not blocks:
        raise ValueError("the student has no converted attention blocks (convert it with tucker_attention.hf.convert)")
    return nn.ModuleDict({path.replace(".", "/"): block for path, block in blocks.items()})


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a converted model that was not converted from ``teacher``: every weight outside the
    converted blocks (embeddings, MLPs, norms) must be the original's (to 1e-3 of its scale: the
    converted folder may be stored in a lower precision)."""
    from .convert import converted_blocks

    inside = tuple(f"{p}." for p in converted_blocks(student))
    theirs = dict(teacher.named_parameters(remove_duplicate=False))
    ours = dict(student.named_parameters(remove_duplicate=False))
    outside = [n for n in theirs if not n.startswith(inside)]
    missing = [n for n in outside if n not in ours]
    if missing or not outside:
        raise ValueError(f"converted: its weights do not match the original model's structure (the original has "
                         f"{', '.join(missing[:3]) or 'no weights outside attention'} that the converted model lacks); "
                         f"give the model it was converted from")
    for name in outside:
        a, b = theirs[name].detach(), ours[name].detach()
        if a.shape != b.shape or (a.numel() and float((a.float() - b.float()).abs().max())
                                  > 1e-3 * max(float(a.abs().max()), 1e-12)):
            raise ValueError(f"converted: weight {name!r} differs from the original's, so it was converted from "
                             f"another model; give the model it was converted from")


