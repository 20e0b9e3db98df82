"""Per-layer budgets by measured sensitivity.

A uniform setting gives every layer the same KV width, but layers differ in how much the logits
suffer when theirs shrinks, and equal spectral energy is not equal damage (docs/pretrained.md).
:func:`measured_allocation` measures it: each layer alone is converted at the uniform setting
(level 0) and one step narrower (level -1), the rest of the model kept, and the next-token KL
against the source on held-in calibration batches is recorded (an encoder's 1 - cosine). A layer's
KL at level j is modelled as ``KL_0 (KL_0 / KL_-1)^j`` (each step keeps the same share of the
damage), and the steps go, one KV step at a time, where the modelled KL falls most (the curves are
convex, so this greedy choice is optimal for the model). Each damage is measured on
:data:`SENSITIVITY_BATCHES` batch in float32 from the layer on (the layers before it replay the
outputs they gave), about a second a measurement for SmolLM2. A step is the same KV width in every
layer (the uniform setting's ``STEP_SHARE``) and costs the same parameters in every layer, so
the allocation keeps exactly the uniform setting's KV floats and attention parameters: both
budgets hold. The conversion then measures the allocation against the uniform setting and keeps
the better (:mod:`.choose`).
"""

from __future__ import annotations

import contextlib
import copy
import heapq

import torch
from torch import nn

from ..._table import text_table
from ...settings.convert import ALLOCATIONS  # noqa: F401  (re-exported)
from ...tensors import STEP_SHARE, conversion_method  # noqa: F401  (STEP_SHARE: re-exported)

#: Levels of a layer on each side of the uniform setting.
STEPS = 2


def level_setting(method: str, setting: tuple, level: int) -> tuple:
    """The (ranks, value_ranks) ``level`` steps wider (negative: narrower) than the uniform ``setting``
    (the method's ``levels``: tucker r3 and r3~ by an even step of r3, r3~ by its own step when it
    differs; mla kv_rank by its step, the query rank kept)."""
    return conversion_method(method).levels.setting(setting, level)


def common_setting(setting: tuple) -> tuple | None:
    """``setting`` as one (ranks, value_ranks) for every layer (a plan's per-layer lists of one entry
    repeated are collapsed), or None when the layers' settings differ."""
    ranks, value_ranks = setting
    if isinstance(ranks, list):
        if len({str(r) for r in ranks}) != 1 or (value_ranks is not None and len({str(v) for v in value_ranks}) != 1):
            return None
        ranks, value_ranks = ranks[0], value_ranks[0] if value_ranks is not None else None
    return tuple(ranks) if isinstance(ranks, list) else ranks, (
        tuple(value_ranks) if isinstance(value_ranks, list) else value_ranks)


def _fits(method: str, layer, setting: tuple) -> bool:
    """Whether ``setting`` is a valid setting for ``layer`` (a source layer, meta is enough) that keeps
    its cache no wider than the source's (the method's ``levels``)."""
    return conversion_method(method).levels.fits(layer, setting)


def levels_allowed(method: str, setting: tuple, layer) -> tuple[int, int]:
    """(lowest, highest) level within :data:`STEPS` that fits ``layer``; (0, 0) at least."""
    low = next(j for j in range(-STEPS, 1) if j == 0 or _fits(method, layer, level_setting(method, setting, j)))
    high = next(j for j in range(STEPS, -1, -1) if j == 0 or _fits(method, layer, level_setting(method, setting, j)))
    return low, high


def allocate(damage: list[tuple[float, float]], allowed: list[tuple[int, int]]) -> list[int]:
    """The level of each layer that minimizes the modelled total damage with the levels summing to 0.

    damage: (KL at level 0, KL at level -1) per layer; allowed: (lowest, highest) level per layer.
    Every layer starts at its lowest level and the steps freed go, one at a time, to the layer whose
    modelled KL ``d0 * rho^j`` (rho = d0 / d_-1, at most 1) falls most with it (on a tie, the one at the
    lower level: equal layers stay at the uniform setting)."""
    if len(damage) != len(allowed):
        raise ValueError(f"damage and allowed need one entry per layer, got {len(damage)} and {len(allowed)}")
    levels = [low for low, _ in allowed]
    spare = -sum(levels)
    rhos = [min(1.0, d0 / dm) if dm > 0 else 1.0 for d0, dm in damage]

    def gain(i: int) -> float:                        # KL(j) - KL(j + 1), modelled
        return damage[i][0] * rhos[i] ** levels[i] * (1.0 - rhos[i])

    heap = [(-gain(i), levels[i], i) for i in range(len(levels)) if levels[i] < allowed[i][1]]   # ties: the lower
    heapq.heapify(heap)
    while spare > 0 and heap:
        *_, i = heapq.heappop(heap)
        levels[i] += 1
        spare -= 1
        if levels[i] < allowed[i][1]:
            heapq.heappush(heap, (-gain(i), levels[i], i))
    return levels


#: Held-in batches each layer's damage is measured on (the allocation is then measured on all of
#: :data:`~.choose.SELECTION_BATCHES` against the uniform setting).
SENSITIVITY_BATCHES = 1


def _damage(score: dict) -> float:
    return 1.0 - score["cosine"] if "cosine" in score else score["kl"]


class _Prefix:
    """Runs a model from one layer on: the layers before it stand in with the outputs they gave on the
    same batch before any block was swapped (recorded once), so measuring block i costs the layers
    from i on. Without one list of layers holding the blocks, every layer runs."""

    def __init__(self, model: nn.Module, paths: list[str], batch, kind: str):
        from ..families.reading import layer_stack
        from .fidelity import run_model

        stack = layer_stack(model, paths)
        self.layers = [layer for layer, _ in stack] if stack is not None else []
        self.index = {path: i for i, (_, inside) in enumerate(stack or []) for path in inside}
        self.outputs: list = []

        def record(module, args, output):
            self.outputs.append(output)

        handles = [layer.register_forward_hook(record) for layer in self.layers]
        try:
            run_model(model, batch, kind)
        finally:
            for handle in handles:
                handle.remove()
        if len(self.outputs) != len(self.layers):       # a model that skips or repeats layers: run them all
            self.layers, self.index = [], {}

    def skipping(self, path: str):
        """A context in which the layers before the one holding ``path`` return their recorded outputs."""
        @contextlib.contextmanager
        def context():
            before = self.layers[:self.index.get(path, 0)]
            for layer, output in zip(before, self.outputs):
                layer.forward = lambda *args, _output=output, **kwargs: _output
            try:
                yield
            finally:
                for layer in before:
                    del layer.forward
        return context()


def measured_allocation(model: nn.Module, method: str, setting: tuple, nope: float, *, calibration, reference,
                        batches, kind: str, qk_norm: str = "keep", progress: bool = False) -> tuple[tuple, str]:
    """((per-layer ranks, per-layer value ranks), table): the allocation of ``setting``'s steps across the
    blocks of ``model`` (left unchanged) by the damage each does alone (module docstring).

    calibration: the blocks' statistics (as for :func:`~.convert.convert`); reference: the source's
    outputs on ``batches`` (:func:`~.fidelity.reference_outputs`), the held-in batches it is measured on."""
    from tqdm.auto import tqdm

    from ..families.common import reading_dtype
    from ..families.reading import find_blocks
    from ..modeling.auto import block_swapped
    from ..sources.compute import release_memory
    from .convert import block_facts, convert_block, per_block
    from .fidelity import fidelity

    setting = common_setting(setting)
    if setting is None:
        raise ValueError("measured_allocation spreads one setting for every layer; these layers' settings differ")
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    probe = copy.deepcopy(model, memo).eval()            # its weights are the model's own; blocks swapped one by one
    blocks = find_blocks(probe)
    covs = per_block("calibration", calibration, blocks)
    batches = batches[:SENSITIVITY_BATCHES]
    reference = [reference[i] for i in range(len(batches))]      # (spilled: read back once)
    prefix = _Prefix(probe, [b.path for b in blocks], batches[0], kind) if len(batches) == 1 else None
    dtype = reading_dtype(next(model.parameters()).dtype)
    damage, allowed = [], []
    for i, block in enumerate(tqdm(blocks, desc="measure each layer", unit="block", disable=not progress,
                                   leave=False)):
        source, cov, scores = block.layer, covs[i], []
        allowed.append(levels_allowed(method, setting, source))
        for level in (0, -1):
            ranks, value_ranks = level_setting(method, setting, level)
            layer = convert_block(source, method, ranks, value_ranks, input_cov=cov, nope_fraction=nope,
                                  qk_norm=qk_norm).to(dtype)
            with (block_swapped(probe, block.path, layer, block_facts(block, layer)),
                  prefix.skipping(block.path) if prefix is not None else contextlib.nullcontext()):
                scores.append(_damage(fidelity(reference, probe, batches, kind, dtype=torch.float32)))
            del layer
        damage.append(tuple(scores))
        del source, cov
        release_memory(collect=False)
    levels = allocate(damage, allowed)
    chosen = [level_setting(method, setting, j) for j in levels]
    rows = [[block.path, f"{d0:.4g}", f"{dm:.4g}", f"{j:+d}", conversion_method(method).levels.width(s)]
            for block, (d0, dm), j, s in zip(blocks, damage, levels, chosen)]
    metric = "1 - cosine" if kind == "encoder" else "KL"
    table = (f"per-layer allocation by measured sensitivity ({metric} with one layer converted, on {len(batches)} "
             f"held-in batches):\n" + text_table(["layer", f"{metric} at the uniform setting",
                                                    f"{metric} one step narrower", "level", "kept"], rows))
    ranks = [s[0] for s in chosen]
    value_ranks = [s[1] for s in chosen] if chosen[0][1] is not None else None
    return (ranks, value_ranks), table
