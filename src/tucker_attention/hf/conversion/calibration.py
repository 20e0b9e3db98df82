"""Input statistics of every attention block, for activation-aware conversion.

A truncated conversion that only looks at the weights treats every input direction alike;
real hidden states are far from isotropic. With the second moment Sigma = E[x^T x] of each
block's inputs, ``convert(..., calibration=stats)`` truncates where the inputs actually lie
(see :func:`tucker_attention.tensors.input_transform`). :func:`attention_statistics` adds the
second moment of the attention-mixed inputs z_m = sum_n a_mn x_n of every head: a value error
reaches the block's output only through them, so the value side is truncated where they lie.

The statistics are gathered layer by layer where the model allows it (its blocks in one list of
layers, as every transformers decoder and encoder has): the model runs once per batch with stand-ins
for its layers (recording what each layer is given: embeddings, masks, RoPE tables), then each layer
runs on all batches before the next, so one layer's sums are in memory
(with ``spill``, finished ones wait on disk) and the head never runs. The result is the whole-model
pass's bit for bit (tested on every supported family).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ...tensors import whitening
from ..families.reading import find_blocks, layer_stack
from ..modeling.blocks import window_mask
from .spill import Spill


@dataclass(frozen=True)
class BlockStatistics:
    """What one block's inputs look like to a conversion, float64 (d, d) each: ``inputs`` E[x^T x]
    over the tokens that reach it; ``mixed`` E[z^T z] over its heads and tokens, z_m = sum_n a_mn x_n
    the inputs mixed by the head's attention (None: not measured). ``whitened``: what
    :meth:`whitenings` returns, when it was computed once and kept (a spilled block's)."""
    inputs: torch.Tensor
    mixed: torch.Tensor | None = None
    whitened: tuple | None = field(default=None, repr=False, compare=False)

    def whitenings(self, mixed: bool = True) -> tuple[tuple, tuple | None]:
        """((S, S^-1) of ``inputs``, (V, V^-1) of ``mixed``, or None without it or with ``mixed=False``):
        :func:`~tucker_attention.tensors.whitening` of each, (d, d) float64. Two eigendecompositions
        of d x d matrices: computed here unless kept in ``whitened``."""
        if self.whitened is not None:
            inputs, value = self.whitened
        else:
            inputs = whitening(self.inputs)
            value = whitening(self.mixed) if mixed and self.mixed is not None else None
        return inputs, value if mixed else None


def _run_blocks(model: nn.Module, batches, record: Callable, progress: bool, done: Callable) -> None:
    """Run ``model`` on ``batches`` (eval mode, restored after) calling ``record(block, x, keep)`` with
    every block's input x (B, T, d) and the (B, T) bool mask of its non-padding tokens (or None), and
    ``done(paths)`` once the blocks ``paths`` have seen every batch.

    When the blocks sit in one list of layers (a decoder's or encoder's), layer by layer
    (:func:`_layer_by_layer`): only one layer's work is in memory and the model's head never runs;
    otherwise the whole model per batch."""
    blocks = find_blocks(model)
    keep: list[torch.Tensor | None] = [None]

    def recorder(block):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            mask = keep[0]
            record(block, x.detach(), mask.to(x.device) if mask is not None and mask.shape == x.shape[:2] else None)
        return hook

    handles = [model.get_submodule(b.path).register_forward_pre_hook(recorder(b), with_kwargs=True) for b in blocks]
    stack = layer_stack(model, [b.path for b in blocks])
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if stack is not None:
                _layer_by_layer(model, stack, batches, keep, done, progress)
                return
            for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
                keep[0] = _padding(batch)
                _call(model, batch)
            done([b.path for b in blocks])
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)


def _padding(batch) -> torch.Tensor | None:
    """The (B, T) bool mask of a batch's non-padding tokens, or None (no mask: every token counts)."""
    if isinstance(batch, torch.Tensor):
        return None
    if isinstance(batch, Mapping):                               # a dict, or a tokenizer's BatchEncoding
        mask = batch.get("attention_mask")
        return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    raise TypeError(f"batches must hold dicts of model inputs or tensors, got {type(batch).__name__}")


def _call(model: nn.Module, batch):
    return model(batch) if isinstance(batch, torch.Tensor) else model(**batch)


class _Captured(Exception):
    """Raised by the last layer's stand-in: every layer's call is recorded, the rest of the model is not run."""


def _layer_by_layer(model: nn.Module, stack: list, batches, keep: list, done: Callable, progress: bool) -> None:
    """Record every layer's call on each batch with the layers standing in (each returns its input; the
    last stops the model), then run the layers one at a time on all batches, each on the previous
    layer's outputs with the arguments the model gave it (masks, RoPE tables, cache)."""
    layers = [layer for layer, _ in stack]
    calls: list[list] = []                                      # per batch: per layer (hidden, args, kwargs)

    def stand_in(index: int, record: list):
        def forward(*args, **kwargs):
            named = not args
            hidden = kwargs.pop("hidden_states") if named else args[0]
            record.append((hidden if index == 0 else None, named, args[1:], kwargs))
            if index == len(layers) - 1:
                raise _Captured
            return hidden
        return forward

    masks = []
    for batch in batches:
        record: list = []
        masks.append(_padding(batch))
        for i, layer in enumerate(layers):
            layer.forward = stand_in(i, record)
        try:
            _call(model, batch)
        except _Captured:
            pass
        finally:
            for layer in layers:
                del layer.forward
        if len(record) != len(layers):
            raise RuntimeError(f"{type(model).__name__} ran {len(record)} of its {len(layers)} layers on a "
                               f"calibration batch; layer-by-layer calibration needs every layer run once")
        calls.append(record)
    hidden = [record[0][0] for record in calls]
    for i, (layer, paths) in enumerate(tqdm(stack, desc="calibration", unit="layer", disable=not progress,
                                            leave=False)):
        for b, record in enumerate(calls):
            _, named, args, kwargs = record[i]
            keep[0] = masks[b]
            out = layer(hidden_states=hidden[b], **kwargs) if named else layer(hidden[b], *args, **kwargs)
            hidden[b] = out[0] if isinstance(out, tuple) else out
            record[i] = None                                   # its arguments are not needed again
        done(paths)


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
    return {path: stats.inputs for path, stats in _statistics(model, batches, False, progress, {}).items()}


@torch.no_grad()
def attention_statistics(model: nn.Module, batches, *, progress: bool = False,
                         spill=None) -> Mapping[str, BlockStatistics]:
    """{block path: :class:`BlockStatistics`}: :func:`input_statistics` and, per block, the mean of
    z^T z over its heads and (non-padding) query tokens, z_m = sum_n a_mn x_n with a_mn the head's
    attention weights (the block's own layer, mask, sliding window and soft-cap). Costs one more
    attention computation per block and batch.

    spill: a :class:`~.spill.Spill`: each block's statistics go to disk as soon as its layer is done
    and the result is a :class:`SpilledStatistics` reading one block's at a time (memory:
    one layer's statistics, not all of them)."""
    return _statistics(model, batches, True, progress, {} if spill is None else SpilledStatistics(spill))


def _statistics(model: nn.Module, batches, mixed: bool, progress: bool, out):
    """Fill ``out`` (a dict, or anything with ``store(path, stats)``) with each block's statistics."""
    sums: dict[str, list] = {}
    seen = [0]

    def record(block, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        d = x.shape[-1]
        entry = sums.setdefault(block.path, [torch.zeros(d, d, dtype=torch.float64), 0,
                                             torch.zeros(d, d, dtype=torch.float64), 0])
        rows = x.reshape(-1, d) if keep is None else x[keep]
        entry[0] += _gram(rows)
        entry[1] += rows.shape[0]
        seen[0] += rows.shape[0]
        if mixed:
            z = _mixed_inputs(block, x, keep)                          # (B, H, T, d)
            z = z.transpose(1, 2)                                      # (B, T, H, d)
            z = (z.reshape(-1, d) if keep is None else z[keep].reshape(-1, d))
            entry[2] += _gram(z)
            entry[3] += z.shape[0]

    def done(paths: list[str]) -> None:
        if not seen[0]:
            raise ValueError("batches is empty: no inputs reached the attention blocks")
        for path in paths:
            if path in sums:
                s, n, m, k = sums.pop(path)
                stats = BlockStatistics(s / n, m / k if mixed and k else None)
                if isinstance(out, dict):
                    out[path] = stats
                else:
                    out.store(path, stats)

    _run_blocks(model, batches, record, progress, done)
    return out


def _mixed_inputs(block, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """z (B, H, T, d) = a @ x for every head, a the block's attention weights, computed by its own layer
    (``layer.forward`` with a kernel that keeps the weights). Padding tokens' inputs are zeroed first:
    their weight is 0, but a model may leave them non-finite (a fully masked row: NaN), and 0 x NaN is NaN."""
    layer = block.layer.to(device=x.device, dtype=x.dtype)
    steps = x.shape[1]
    mask = None if keep is None else keep[:, None, None, :]
    x = x if keep is None else x.masked_fill(~keep[..., None], 0.0)
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


class SpilledStatistics(Mapping):
    """{block path: :class:`~.calibration.BlockStatistics`} kept in a :class:`Spill`, in the order stored."""

    def __init__(self, spill: Spill):
        self._spill, self._paths = spill, []

    def store(self, path: str, stats) -> None:
        """Keep ``stats`` and its whitenings (computed here once, not by every candidate that reads it;
        statistics that have none, e.g. all zero, are kept without, for the conversion to refuse)."""
        tensors = {"inputs": stats.inputs} | ({} if stats.mixed is None else {"mixed": stats.mixed})
        try:
            (tensors["S"], tensors["S_inv"]), value = stats.whitenings()
        except ValueError:
            pass
        else:
            if value is not None:
                tensors["V"], tensors["V_inv"] = value
        self._spill.put(f"statistics/{path}", tensors)
        self._paths.append(path)

    def __getitem__(self, path: str):
        if path not in self._paths:
            raise KeyError(path)
        t = self._spill.get(f"statistics/{path}")
        whitened = ((t["S"], t["S_inv"]), (t["V"], t["V_inv"]) if "V" in t else None) if "S" in t else None
        return BlockStatistics(t["inputs"], t.get("mixed"), whitened=whitened)

    def __iter__(self):
        return iter(list(self._paths))

    def __len__(self) -> int:
        return len(self._paths)
