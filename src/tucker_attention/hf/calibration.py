"""Input statistics of every attention block, for activation-aware conversion.

A truncated conversion that only looks at the weights treats every input direction alike;
real hidden states are far from isotropic. With the second moment Sigma = E[x^T x] of each
block's inputs, ``convert(..., calibration=stats)`` truncates where the inputs actually lie
(see :func:`tucker_attention.tensors.input_transform`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .read import find_blocks


@torch.no_grad()
def input_statistics(model: nn.Module, batches, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """{block path: Sigma (d, d) float64}: the mean of x^T x over every (non-padding) token that
    reaches the block, from running ``model`` on ``batches``.

    batches: an iterable of model inputs, each a dict of keyword arguments (e.g. tokenizer
    output; its ``attention_mask`` (B, T) excludes padding tokens) or a tensor (the first
    positional argument, e.g. pixel values). The model is run in eval mode and left as it was.
    """
    from tqdm.auto import tqdm

    blocks = find_blocks(model)
    sums = {b.path: torch.zeros(b.layer.d_model, b.layer.d_model, dtype=torch.float64) for b in blocks}
    counts = dict.fromkeys(sums, 0)
    keep: list[torch.Tensor | None] = [None]

    def recorder(path):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            mask = keep[0]
            rows = x.reshape(-1, x.shape[-1]) if mask is None or mask.shape != x.shape[:2] else x[mask.to(x.device)]
            rows = rows.detach().to("cpu", torch.float64)
            sums[path].add_(rows.T @ rows)
            counts[path] += rows.shape[0]
        return hook

    handles = [model.get_submodule(b.path).register_forward_pre_hook(recorder(b.path), with_kwargs=True)
               for b in blocks]
    training = model.training
    try:
        model.eval()
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
    if not any(counts.values()):
        raise ValueError("batches is empty: no inputs reached the attention blocks")
    return {path: sums[path] / counts[path] for path in sums}
