"""What a distillation run (:mod:`.distill`) minimizes and checks: the losses by name (the per-layer
``"block-error"``: each converted block against the original block on the original's own block
inputs; the end-to-end ``"logit-kl"``: the next-token KL), the per-block held-out errors, which
parameters train, and whether a converted model belongs to an original.

A new loss is one function ``loss(teacher, student, input_ids, blocks)`` registered under its name
with :func:`register_loss` (then ``DistillConfig(layer_loss=name)`` or ``loss=name``, ``tucker-attn
distill --loss NAME``); :func:`block_pairs` gives a per-layer loss the blocks' outputs and targets.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ...settings.distill import LOSSES, PARAMS, get_loss, loss_names, register_loss

__all__ = ["LOSSES", "block_error", "block_errors", "block_io", "block_pairs", "check_pair", "get_loss",
           "logit_kl", "loss_names", "register_loss", "share_frozen", "trained_modules"]


def block_io(teacher: nn.Module, paths: list[str], input_ids: torch.Tensor) -> dict:
    """{path: (args, kwargs, output)} of the original's attention modules at ``paths`` on ``input_ids``
    (B, T), caught by forward hooks in one forward without gradient."""
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


def block_pairs(teacher: nn.Module, student: nn.Module, blocks: list[str],
                input_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{path: (the converted block's output, the original block's output)}, each (B, T, d), both on the
    original block's inputs: each block's gradient comes from its own output only."""
    pairs = {}
    for path, (args, kwargs, target) in block_io(teacher, blocks, input_ids).items():
        out = student.get_submodule(path)(*args, **kwargs)
        pairs[path] = (out[0] if isinstance(out, tuple) else out, target)
    return pairs


def block_error(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor, blocks: list[str]) -> torch.Tensor:
    """Per-layer matching (``"block-error"``): the mean over blocks and windows of the relative squared
    output error ||y_student - y||² / ||y||² (a mean over windows, so DDP's slices and accumulation's
    micro-batches average to it); nothing is back-propagated through the network."""
    errors = []
    for out, target in block_pairs(teacher, student, blocks, input_ids).values():
        out, target = out.float(), target.float()
        errors.append((out - target).pow(2).sum((1, 2)) / target.pow(2).sum((1, 2)).clamp_min(1e-30))   # (B,)
    return torch.stack(errors).mean()


#: positions of one chunk of the end-to-end KL (its logits: chunk x vocabulary floats, recomputed
#: in the backward pass instead of kept)
KL_CHUNK = 128


def _split_head(model: nn.Module):
    """(base model giving the last hidden states, output head) of a causal LM whose logits are
    ``head(hidden)`` (checked by :func:`_chunkable`), or None."""
    base, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if base is None or base is model or head is None or getattr(model.config, "final_logit_softcapping", None):
        return None
    return base, head


def _kl_chunk(student_hidden, teacher_hidden, head) -> torch.Tensor:
    """Summed KL(teacher ‖ student) over the positions of one chunk of hidden states (B, t, d)."""
    with torch.no_grad():
        target = head(teacher_hidden).float().log_softmax(-1)
    got = head(student_hidden).float().log_softmax(-1)
    return F.kl_div(got.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="sum")


def logit_kl(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor, blocks=()) -> torch.Tensor:
    """End-to-end (``"logit-kl"``): KL(original ‖ converted) of the next-token distributions, mean over
    positions (``blocks`` is not needed).

    Where the logits are the output head of the last hidden states (checked against the models'
    own logits on two positions), the KL is taken :data:`KL_CHUNK` positions at a time, each chunk's
    logits recomputed in the backward pass (``torch.utils.checkpoint``): no (batch, tokens,
    vocabulary) tensor of either model is held. Otherwise from the whole logits."""
    split = _split_head(student) if _chunkable(teacher, student, input_ids) else None
    if split is None:
        with torch.no_grad():
            target = teacher(input_ids=input_ids, use_cache=False).logits.float().log_softmax(-1)
        got = student(input_ids=input_ids, use_cache=False).logits.float().log_softmax(-1)
        return F.kl_div(got.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
    base, head = split
    with torch.no_grad():
        teacher_hidden = _split_head(teacher)[0](input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state
    total = sum(torch.utils.checkpoint.checkpoint(_kl_chunk, h, t, head, use_reentrant=False)
                for h, t in zip(hidden.split(KL_CHUNK, dim=1), teacher_hidden.split(KL_CHUNK, dim=1)))
    return total / (input_ids.shape[0] * input_ids.shape[1])


@torch.no_grad()
def _chunkable(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether both models' logits are ``head(last hidden states)`` (to float round-off), tried on the
    first two positions of the first row (two tiny forwards a step)."""
    ids = input_ids[:1, :2]
    for model in (teacher, student):
        split = _split_head(model)
        if split is None:
            return False
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = split[1](split[0](input_ids=ids, use_cache=False).last_hidden_state).float()
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            return False
    return True


@torch.no_grad()
def block_errors(teacher: nn.Module, student: nn.Module, batches: list[dict]) -> dict[str, float]:
    """{block path: relative squared output error} of every converted block on the original's
    block inputs of ``batches`` (summed over the batches before the ratio)."""
    from ..conversion.convert import converted_blocks

    paths = list(converted_blocks(student))
    num, den = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0)
    for batch in batches:
        for path, (out, target) in block_pairs(teacher, student, paths, batch["input_ids"]).items():
            num[path] += float((out.double() - target.double()).pow(2).sum())
            den[path] += float(target.double().pow(2).sum())
    return {p: num[p] / max(den[p], 1e-300) for p in paths}


def trained_modules(student: nn.Module, params: str) -> nn.Module:
    """The module whose parameters train (and whose state a checkpoint holds): the converted
    blocks (``"attention"``, gathered in a ModuleDict keyed by path with ``/`` for ``.``) or the
    whole model (``"all"``)."""
    from ..conversion.convert import converted_blocks

    if params not in PARAMS:
        raise ValueError(f"params must be one of {PARAMS}, got {params!r}")
    if params == "all":
        return student
    blocks = converted_blocks(student)
    if not blocks:
        raise ValueError("params='attention' trains the converted attention blocks, but the student has none; "
                         "convert it first (tucker_attention.hf.convert) or train params='all'")
    return nn.ModuleDict({path.replace(".", "/"): block for path, block in blocks.items()})


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a converted model that was not converted from ``teacher``: every weight outside the
    converted blocks (embeddings, MLPs, norms) must be the original's, up to the rounding of the
    coarser of the two stored dtypes (:func:`pairing_tolerance`: a bf16 or fp16 conversion of
    the same original passes; another model's weights differ by far more)."""
    from ..conversion.convert import converted_blocks

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
        a, b = theirs[name], ours[name]
        tolerance = pairing_tolerance(a.dtype, b.dtype) * max(_largest_difference(a, None), 1e-12)
        if a.shape != b.shape or _largest_difference(a, b) > tolerance:
            raise ValueError(f"converted: weight {name!r} differs from the original's, so it was converted from "
                             f"another model; give the model it was converted from")


def pairing_tolerance(*dtypes: torch.dtype) -> float:
    """The largest max|a - b| / max|a| two copies of one weight may differ by when stored in
    ``dtypes``: the coarser dtype's machine epsilon (twice its worst rounding), at least 1e-3."""
    return max([1e-3] + [torch.finfo(d).eps for d in dtypes if d.is_floating_point])


def _largest_difference(a: torch.Tensor, b: torch.Tensor | None, chunk: int = 1 << 22) -> float:
    """max |a - b| (with b None: max |a|) of two tensors of one shape, in float32 pieces of ``chunk``
    elements (a 128k-row embedding is not copied whole); 0 for empty tensors."""
    a = a.detach().reshape(-1)
    b = None if b is None else b.detach().reshape(-1)
    largest = 0.0
    for start in range(0, a.numel(), chunk):
        piece = a[start:start + chunk].float()
        if b is not None:
            piece = piece - b[start:start + chunk].float()
        largest = max(largest, float(piece.abs().max()))
    return largest


def share_frozen(teacher: nn.Module, student: nn.Module) -> int:
    """Make every student parameter outside the converted blocks the teacher's own tensor (they are
    equal, :func:`check_pair`; when only attention trains they are frozen in both): the weights are
    held once, not twice. Returns the number of parameters shared."""
    from ..conversion.convert import converted_blocks

    inside = tuple(f"{p}." for p in converted_blocks(student))
    theirs = dict(teacher.named_parameters(remove_duplicate=False))
    shared = 0
    for name, ours in list(student.named_parameters(remove_duplicate=False)):
        if name.startswith(inside) or name not in theirs or theirs[name] is ours:
            continue
        owner, _, leaf = name.rpartition(".")
        student.get_submodule(owner)._parameters[leaf] = theirs[name]
        shared += ours.numel()
    return shared
