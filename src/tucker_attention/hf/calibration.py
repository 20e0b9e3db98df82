"""Input statistics of every attention block, for activation-aware conversion.

A truncated conversion that only looks at the weights treats every input direction alike;
real hidden states are far from isotropic. With the second moment Sigma = E[x^T x] of each
block's inputs, ``convert(..., calibration=stats)`` truncates where the inputs actually lie
(see :func:`tucker_attention.tensors.input_transform`). :func:`attention_statistics` adds the
second moment of the attention-mixed inputs z_m = sum_n a_mn x_n of every head: a value error
reaches the block's output only through them, so the value side is truncated where they lie.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .reading import find_blocks


@dataclass(frozen=True)
class BlockStatistics:
    """What one block's inputs look like to a conversion, float64 (d, d) each: ``inputs`` E[x^T x]
    over the tokens that reach it; ``mixed`` E[z^T z] over its heads and tokens, z_m = sum_n a_mn x_n
    the inputs mixed by the head's attention (None: not measured)."""
    inputs: torch.Tensor
    mixed: torch.Tensor | None = None


def _run_blocks(model: nn.Module, batches, record: Callable, progress: bool) -> None:
    """Run ``model`` on ``batches`` (eval mode, restored after) calling ``record(block, x, keep)`` with
    every block's input x (B, T, d) and the (B, T) bool mask of its non-padding tokens (or None)."""
    from tqdm.auto import tqdm

    blocks = find_blocks(model)
    keep: list[torch.Tensor | None] = [None]

    def recorder(block):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            mask = keep[0]
            record(block, x.detach(), mask.to(x.device) if mask is not None and mask.shape == x.shape[:2] else None)
        return hook

    handles = [model.get_submodule(b.path).register_forward_pre_hook(recorder(b), with_kwargs=True) for b in blocks]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
                if isinstance(batch, torch.Tensor):
                    keep[0] = None
                    model(batch)
                elif isinstance(batch, Mapping):             # a dict, or a tokenizer's BatchEncoding
                    mask = batch.get("attention_mask")
                    keep[0] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                    model(**batch)
                else:
                    raise TypeError(f"batches must hold dicts of model inputs or tensors, got {type(batch).__name__}")
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    return (rows.T @ rows).to("cpu", torch.float64)


@torch.no_grad()
def input_statistics(model: nn.Module, batches, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """{block path: Sigma (d, d) float64}: the mean of x^T x over every (non-padding) token that
    reaches the block, from running ``model`` on ``batches``.

    batches: an iterable of model inputs, each a dict of keyword arguments (e.g. tokenizer
    output; its ``attention_mask`` (B, T) excludes padding tokens) or a tensor (the first
    positional argument, e.g. pixel values). The model is run in eval mode and left as it was.
    """
    return {path: stats.inputs for path, stats in _statistics(model, batches, False, progress).items()}


@torch.no_grad()
def attention_statistics(model: nn.Module, batches, *, progress: bool = False) -> dict[str, BlockStatistics]:
    """{block path: :class:`BlockStatistics`}: :func:`input_statistics` and, per block, the mean of
    z^T z over its heads and (non-padding) query tokens, z_m = sum_n a_mn x_n with a_mn the head's
    attention weights (the block's own layer, mask, sliding window and soft-cap). Costs one more
    attention computation per block and batch."""
    return _statistics(model, batches, True, progress)


def _statistics(model: nn.Module, batches, mixed: bool, progress: bool) -> dict[str, BlockStatistics]:
    sums: dict[str, list] = {}

    def record(block, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        d = x.shape[-1]
        entry = sums.setdefault(block.path, [torch.zeros(d, d, dtype=torch.float64), 0,
                                             torch.zeros(d, d, dtype=torch.float64), 0])
        rows = x.reshape(-1, d) if keep is None else x[keep]
        entry[0] += _gram(rows)
        entry[1] += rows.shape[0]
        if mixed:
            z = _mixed_inputs(block, x, keep)                          # (B, H, T, d)
            z = z.transpose(1, 2)                                      # (B, T, H, d)
            z = (z.reshape(-1, d) if keep is None else z[keep].reshape(-1, d))
            entry[2] += _gram(z)
            entry[3] += z.shape[0]

    _run_blocks(model, batches, record, progress)
    if not any(entry[1] for entry in sums.values()):
        raise ValueError("batches is empty: no inputs reached the attention blocks")
    return {path: BlockStatistics(s / n, m / k if mixed and k else None) for path, (s, n, m, k) in sums.items()}


def _mixed_inputs(block, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """z (B, H, T, d) = a @ x for every head, a the block's attention weights, computed by its own layer
    (``layer.forward`` with a kernel that keeps the weights)."""
    from .tiny import window_mask

    layer = block.layer.to(device=x.device, dtype=x.dtype)
    steps = x.shape[1]
    mask = None if keep is None else keep[:, None, None, :]
    band = window_mask(steps, block.sliding_window)
    if band is not None:
        mask = band.to(x.device) if mask is None else mask & band.to(x.device)
    kept: list[torch.Tensor] = []

    def kernel(q, k, v, *, scale, causal, attn_mask, dropout_p):
        heads = q.shape[1]
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        logits = q @ k.transpose(-1, -2) * scale                       # (B, H, T, S)
        if block.softcap is not None:
            logits = torch.tanh(logits / block.softcap) * block.softcap
        allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril(logits.shape[-1] - logits.shape[-2])
        if attn_mask is not None:
            allowed = allowed & attn_mask
        weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        kept.append(weights)
        return weights @ v

    layer(x, attn_mask=mask, kernel=kernel)
    return kept[0] @ x.unsqueeze(1)
