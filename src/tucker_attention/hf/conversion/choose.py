"""Settings of a conversion that only a measurement can settle, chosen by measuring them.

Keeping RoPE exact limits a truncation to mixing pairs of one frequency; partial RoPE (the
lowest frequencies stop rotating, :func:`tucker_attention.tensors.rope.derotated`) frees it but
changes the positional scheme. Under a parameter budget, Tucker can also spend it on a wider key
latent (r3) or a wider query side (r2). Neither follows from the weights alone, so
:func:`measured` converts each candidate and keeps the one whose next-token KL (an encoder's
cosine) against the source is best on held-in calibration pieces, never the evaluation ones:
first the partial-RoPE share at the middle setting, then the other settings at that share, then
(``allocation='measured'``) the kept setting's KV spread across layers by their measured
sensitivity (:mod:`.allocation`), kept when it measures better than the uniform setting.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from ..sources.original import ConvertError

#: Shares of the lowest RoPE frequencies that partial-RoPE candidates stop rotating.
NOPE_FRACTIONS = (0.0, 0.25, 0.5, 0.625)
#: Held-in calibration batches a candidate is measured on.
SELECTION_BATCHES = 2


@dataclass
class Choice:
    """The conversion kept: its model, setting (ranks, value_ranks) and index among the settings, its
    partial-RoPE share and warnings; ``scores`` [(label, score)] of every candidate measured (empty
    when there was nothing to choose)."""
    model: nn.Module
    setting: tuple
    index: int
    nope_fraction: float
    notes: list[str]
    scores: list[tuple[str, dict]] = field(default_factory=list)
    allocation: str | None = None

    def table(self) -> str | None:
        if not self.scores:
            return None
        metric = "cosine" if "cosine" in self.scores[0][1] else "kl"
        lines = [f"chosen by measurement ({metric} against the source on {SELECTION_BATCHES} held-in calibration "
                 f"batches):"]
        best = min(self.scores, key=lambda item: -item[1]["cosine"] if metric == "cosine" else item[1]["kl"])
        lines += [f"  {label}: {metric} {score[metric]:.4g}" + ("  <- kept" if label == best[0] else "")
                  for label, score in self.scores]
        return "\n".join(lines + ([self.allocation] if self.allocation else []))


def _label(setting: tuple, nope_fraction: float) -> str:
    ranks, value_ranks = setting
    if isinstance(ranks, list):                         # per-layer ranks: show the first layer's
        ranks, value_ranks = ranks[0], value_ranks[0] if value_ranks else None
    width = f"ranks {ranks}" + (f" / {value_ranks}" if value_ranks is not None else "")
    rope = "RoPE exact" if not nope_fraction else f"partial RoPE ({nope_fraction:g} of frequencies unrotated)"
    return f"{width}, {rope}"


def _rope_kept(method: str, layers: dict, qk_norm: str = "keep") -> bool:
    """Whether ``method`` keeps these layers' RoPE in a latent (so partial RoPE is an option): a method
    taking ``nope_fraction`` that keeps their RoPE exactly (Tucker of any RoPE, MLA of head RoPE); not
    one keeping q/k norms (``norm_forms``) of layers whose norms are kept (their key heads rotate
    exactly, :class:`~tucker_attention.layers.TuckerHeadsAttention`)."""
    from ...tensors import conversion_method, heads_form_applies

    record = conversion_method(method)
    ropes = {layer.rope for layer in layers.values()} - {None}
    if record.norm_forms and qk_norm == "keep" and all(heads_form_applies(layer) for layer in layers.values()):
        return False
    return bool(ropes) and "nope_fraction" in record.options and all(record.keeps(rope) for rope in ropes)


def measured(model: nn.Module, method: str, settings: list[tuple], layers: dict, partial_rope, *, calibration,
             batches, kind: str, allocation: str = "uniform", qk_norm: str = "keep", progress: bool = False,
             spill=None) -> Choice:
    """Convert ``model`` (a copy) with ``settings`` [(ranks, value_ranks)] and the partial-RoPE shares
    ``partial_rope`` allows ('auto': :data:`NOPE_FRACTIONS` below full rank), measuring on the first
    :data:`SELECTION_BATCHES` of ``batches`` when there is more than one candidate (the source's
    outputs on them kept in ``spill``, a :class:`~.spill.Spill`, when given). allocation: 'measured'
    also measures the kept setting spread across layers (:func:`~.allocation.measured_allocation`)."""
    full = settings == [(None, None)]
    if partial_rope == "auto":
        nopes = list(NOPE_FRACTIONS) if _rope_kept(method, layers, qk_norm) and not full else [0.0]
    else:
        if partial_rope and not _rope_kept(method, layers, qk_norm):
            raise ConvertError("partial_rope", f"partial RoPE is for tucker (a RoPE source; with q/k norms only "
                                               f"when they are linearized, qk_norm='linearize') or mla (a head-RoPE "
                                               f"source), not {method} of this model")
        nopes = [float(partial_rope)]
    middle = len(settings) // 2
    if len(nopes) == 1 and len(settings) == 1 and allocation != "measured":
        return _convert(model, method, settings[0], 0, nopes[0], calibration, progress, qk_norm)
    from ..sources.compute import release_memory
    from .fidelity import fidelity, reference_outputs

    selection = batches[:SELECTION_BATCHES]
    release_memory()                                   # what the plan freed
    reference = reference_outputs(model, selection, kind, spill=spill)
    best, scores = None, []

    def measure(index: int, nope: float, setting: tuple | None = None, label: str | None = None) -> None:
        nonlocal best
        setting = settings[index] if setting is None else setting
        choice = _convert(model, method, setting, index, nope, calibration, progress, qk_norm)
        score = fidelity(reference, choice.model, selection, kind)
        scores.append((label or _label(setting, nope), score))
        better = best is None or (score["cosine"] > best[1]["cosine"] if "cosine" in score
                                  else score["kl"] < best[1]["kl"])
        if better:
            best = (choice, score)
        del choice
        release_memory()                               # the loser's attention and the scoring's buffers

    for nope in nopes:                                 # the partial-RoPE share at the middle setting
        measure(middle, nope)
    for index in range(len(settings)):                 # then the other settings at the share kept
        if index != middle:
            measure(index, best[0].nope_fraction)
    table = None
    if allocation == "measured":
        from .allocation import measured_allocation

        uniform = best[0]
        spread, table = measured_allocation(model, method, uniform.setting, uniform.nope_fraction,
                                            calibration=calibration, reference=reference, batches=selection,
                                            kind=kind, qk_norm=qk_norm, progress=progress)
        measure(uniform.index, uniform.nope_fraction, spread,
                f"the same KV spread across layers by measured sensitivity "
                f"({_label(uniform.setting, uniform.nope_fraction)})")
    best[0].scores, best[0].allocation = scores, table
    return best[0]


def _convert(model, method: str, setting: tuple, index: int, nope: float, calibration, progress: bool,
             qk_norm: str = "keep") -> Choice:
    """One candidate: a copy of ``model`` sharing its weights outside attention, the new layers in the
    dtype they were computed in (at least float32: measured before any rounding to the stored dtype)."""
    from ..families.common import reading_dtype
    from .convert import convert

    ranks, value_ranks = setting
    dtype = reading_dtype(next(model.parameters()).dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            converted = convert(model, method, ranks, value_ranks=value_ranks, calibration=calibration,
                                nope_fraction=nope, inplace=False, share_weights=True, dtype=dtype,
                                qk_norm=qk_norm, progress=progress).eval()
        except ValueError as err:
            raise ConvertError("ranks", str(err)) from None
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return Choice(converted, setting, index, nope, notes)
