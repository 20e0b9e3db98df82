"""Choosing Tucker ranks per layer for a parameter or KV-cache budget.

Every layer's ranks come from one shared energy level e: in each mode of W and W_tilde the
smallest rank holding a fraction e of the squared spectrum (PAPER.md §7). Layers whose
weights concentrate their energy get small ranks, the others larger ones. e is the largest
level (found by bisection) whose total cost fits the budget. The reported error of a layer
is the relative Frobenius error of its truncated HOSVD, ||T - T_hat|| / ||T|| for T = W and
W_tilde (exact: the truncation is an orthogonal projection, so ||T - T_hat||^2 = ||T||^2 -
||core||^2). Per-layer costs and the greedy allocation on Tucker layers (:func:`allocate_ranks`,
used for RoPE layers) are in :mod:`.allocate`, re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._checks import check_choice
from .._table import text_table
from ..layers import Attention, TuckerAttention
from .algebra import energy_rank
from .allocate import NEGLIGIBLE_ENERGY, allocate_ranks, energy_chains, layer_cost, tucker_param_count  # noqa: F401
from .exact import to_tucker
from .methods import MethodNames, conversion_method
from .view import attention_factors, factored_hosvd

BUDGETS = ("params", "kv")


@dataclass
class RankPlan:
    """Ranks per layer for :func:`tucker_attention.hf.convert` (``ranks=plan.ranks,
    value_ranks=plan.value_ranks``) or ``compress``, with what they cost and lose.

    energy: the common energy level of every mode, or None for another rule (``how`` says which),
    whose ``errors`` are then the HOSVD bound sqrt(sum of the dropped relative energies of the
    three modes)."""
    paths: list[str]
    ranks: list[tuple[int, int, int]]
    value_ranks: list[tuple[int, int, int]]
    energy: float | None
    params: int
    source_params: int
    kv: int
    source_kv: int
    errors: list[tuple[float, float]] = field(default_factory=list)
    how: str = ""

    @property
    def pair(self) -> tuple[list, list]:
        """(ranks, value_ranks): what ``convert`` takes."""
        return self.ranks, self.value_ranks

    def table(self) -> str:
        """Per-layer ranks and relative errors, then the totals."""
        rows = [[p, str(r), str(v), f"{e[0]:.4f}", f"{e[1]:.4f}"]
                for p, r, v, e in zip(self.paths, self.ranks, self.value_ranks, self.errors)]
        bound = " (bound)" if self.energy is None else ""
        head = ["layer", "ranks W", "ranks W~", f"rel. err W{bound}", f"rel. err W~{bound}"]
        how = f"energy level {self.energy:.4f}" if self.energy is not None else self.how
        totals = (f"{how}: attention params {self.params:,} of {self.source_params:,} "
                  f"({self.params / self.source_params:.3f}), KV floats/token {self.kv:,} of {self.source_kv:,} "
                  f"({self.kv / self.source_kv:.3f})")
        return text_table(head, rows) + "\n" + totals


def _budget_value(name: str, value, source: int) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            or value > 1 and value != int(value)):
        raise ValueError(f"{name} must be a positive whole count or a fraction in (0, 1] (float) of the source's, "
                         f"got {value!r}")
    return int(value * source) if isinstance(value, float) and value <= 1 else int(value)


def plan_ranks(layers: dict[str, Attention], *, params=None, kv=None, even_r3: bool | None = None) -> RankPlan:
    """Ranks per layer under a budget: give one or both of

    params: total attention parameters (an int, or a float in (0, 1]: that fraction of the
        source layers' parameters);
    kv: total KV-cache floats per token over all layers (r3 + r3~ per layer), int or fraction.

    Without RoPE every mode of every layer keeps one common energy level (the largest that fits).
    When a layer has RoPE the plan is made as :func:`~.convert.compress` converts it, RoPE exact: on
    the exact latent-RoPE Tucker forms (:func:`~.exact.to_tucker`), by :func:`allocate_ranks` with the
    key latent allocated in RoPE pairs (ranks at most the exact forms'). even_r3 (energy-level plans):
    round r3 up to even. Raises ValueError when the smallest setting exceeds a budget.
    """
    if params is None and kv is None:
        raise ValueError("give a budget: params=... (attention parameters) and/or kv=... (KV floats per token)")
    if not layers:
        raise ValueError("layers is empty: no attention layers to plan ranks for")
    if any(layer.rope is not None for layer in layers.values()):
        return _plan_rope(layers, params, kv)
    items = list(layers.items())
    facts = []
    for _, layer in items:
        f = attention_factors(layer, ignore_rope=True)
        facts.append((f, f.pre.spectra(), f.post.spectra(), f.out_bias is not None,
                      layer.rope is not None if even_r3 is None else even_r3))
    source_params, source_kv = _source_totals(layers)
    limits = _limits(params, kv, source_params, source_kv)

    def ranks_at(energy: float):
        out = []
        for (_, pre, post, _, even), (_, layer) in zip(facts, items):
            r = [energy_rank(s, energy) for s in pre]
            v = [energy_rank(s, energy) for s in post]
            if even and r[2] % 2:
                r[2] = min(r[2] + 1, layer.d_model)
            out.append((tuple(r), tuple(v)))
        return out

    def cost(plan) -> tuple[int, int]:
        n_params = sum(tucker_param_count(layer.n_heads, layer.d_model, r, v, bias=fact[3])
                       for (r, v), (_, layer), fact in zip(plan, items, facts))
        return n_params, sum(r[2] + v[2] for r, v in plan)

    def fits(plan) -> bool:
        return all(limit is None or value <= limit for value, limit in zip(cost(plan), limits))

    low, high = 1e-9, 1.0
    if not fits(ranks_at(low)):
        smallest = cost(ranks_at(low))
        name, limit, minimum = next((n, lim, c) for n, lim, c in zip(BUDGETS, limits, smallest)
                                    if lim is not None and c > lim)
        raise ValueError(f"{name} budget {limit:,} is below the smallest Tucker setting's {minimum:,}")
    if not fits(ranks_at(high)):
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if fits(ranks_at(mid)) else (low, mid)
        high = low
    plan = ranks_at(high)
    errors = []
    for (f, *_), (r, v) in zip(facts, plan):
        errors.append(tuple(_hosvd_error(side, rk) for side, rk in ((f.pre, r), (f.post, v))))
    n_params, n_kv = cost(plan)
    return RankPlan([p for p, _ in items], [r for r, _ in plan], [v for _, v in plan], high, n_params,
                    source_params, n_kv, source_kv, errors)


def _source_totals(layers: dict[str, Attention]) -> tuple[int, int]:
    """(attention parameters, KV floats per token) of the source layers."""
    return (sum(sum(p.numel() for p in layer.parameters()) for layer in layers.values()),
            sum(sum(h * w for h, w in layer.cache_spec().values()) for layer in layers.values()))


def _limits(params, kv, source_params: int, source_kv: int) -> list[int | None]:
    return [None if value is None else _budget_value(name, value, total)
            for name, value, total in (("params", params, source_params), ("kv", kv, source_kv))]


def _exact_forms(layers: dict[str, Attention], params, kv) -> tuple[list[TuckerAttention], list, tuple, list]:
    """The layers' exact latent-RoPE Tucker forms on the meta device (their structure: ranks, costs),
    their :func:`~.allocate.energy_chains`, the source totals (:func:`_source_totals`) and the
    budgets' limits, taken in one pass one layer at a time: one exact form (float64, H x d x r3
    cores) is held at once, not one per layer, and each layer is read once (``layers`` may compute
    its values on access, e.g. whitened by calibration statistics)."""
    _limits(params, kv, 1, 1)                               # the budgets' form, checked before the work
    forms, chains, totals = [], [], [0, 0]
    for layer in layers.values():
        for i, total in enumerate(_source_totals({"": layer})):
            totals[i] += total
        exact = to_tucker(layer)
        chains.append(energy_chains(exact, rope_pairs=True))
        forms.append(exact.to("meta"))
        del layer, exact
    return forms, chains, tuple(totals), _limits(params, kv, *totals)


def _plan_rope(layers: dict[str, Attention], params, kv) -> RankPlan:
    """:func:`plan_ranks` for layers with RoPE: greedy allocation on their exact latent-RoPE forms."""
    exact, spectra, (source_params, source_kv), limits = _exact_forms(layers, params, kv)
    plan = allocate_ranks(exact, params=limits[0], kv=limits[1], rope_pairs=True, chains=spectra)
    errors, n_params, n_kv = [], 0, 0
    for layer, (r, v), (chains, steps) in zip(exact, plan, spectra):
        dropped = [sum(chain[rank // step:]) if chain is not None else 0.0
                   for chain, step, rank in zip(chains, steps, r + v)]
        if layer.shared_kv:
            dropped[5] = dropped[2]
        errors.append(tuple(max(0.0, sum(dropped[3 * side:3 * side + 3])) ** 0.5 for side in (0, 1)))
        cost = layer_cost(layer, r, v)
        n_params, n_kv = n_params + cost[0], n_kv + cost[1]
    return RankPlan(list(layers), [r for r, _ in plan], [v for _, v in plan], None, n_params, source_params, n_kv,
                    source_kv, errors, "greedy per-mode allocation on the exact latent-RoPE forms")


def plan_uniform(layers: dict[str, Attention], *, params=None, kv=None, r3: int | None = None) -> RankPlan:
    """One Tucker setting for every layer (as GQA / MLA have one), converted as :func:`~.convert.compress`
    does (RoPE exact): (h, r2, r3) for W and (h, r2, r3) for W_tilde, within the exact forms' ranks.
    r3 (even under RoPE): given, or the largest that fits ``kv``; then r2 the largest that fits
    ``params``. Budgets as :func:`plan_ranks` (one or both); errors are HOSVD bounds. Raises
    ValueError when no setting fits."""
    if params is None and kv is None:
        raise ValueError("give a budget: params=... (attention parameters) and/or kv=... (KV floats per token)")
    if not layers:
        raise ValueError("layers is empty: no attention layers to plan ranks for")
    exact, spectra, (source_params, source_kv), limits = _exact_forms(layers, params, kv)
    step = 2 if any(t.rope is not None for t in exact) else 1
    top3 = min(min(t.ranks[2], t.value_ranks[2]) for t in exact) // step * step
    top2 = min(min(t.ranks[1], t.value_ranks[1]) for t in exact)

    def setting(t: TuckerAttention, k: int, q: int):
        return (t.n_heads, q, k), (t.n_heads, q, k)

    def cost(k: int, q: int) -> tuple[int, int]:
        costs = [layer_cost(t, *setting(t, k, q)) for t in exact]
        return sum(c[0] for c in costs), sum(c[1] for c in costs)

    def largest(values: list[int], fits) -> int | None:
        if not values or not fits(values[0]):
            return None
        low, high = 0, len(values) - 1
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(values[mid]) else (low, mid - 1)
        return values[low]

    keys = list(range(step, top3 + 1, step))
    if r3 is not None:
        if r3 not in keys:
            raise ValueError(f"r3 must be one of {step}, {2 * step}, ... {top3} (the exact forms' key width), got {r3}")
        keys = [r3]
    k = largest(keys, lambda k: limits[1] is None or cost(k, 1)[1] <= limits[1])
    q = None if k is None else largest(list(range(1, top2 + 1)),
                                       lambda q: limits[0] is None or cost(k, q)[0] <= limits[0])
    if k is None or q is None:
        smallest = cost(keys[0], 1)
        name, limit, minimum = next((n, lim, c) for n, lim, c in zip(BUDGETS, limits, smallest)
                                    if lim is not None and c > lim)
        raise ValueError(f"{name} budget {limit:,} is below the smallest uniform Tucker setting's {minimum:,} "
                         f"(r2 = 1, r3 = {keys[0]})")
    plan = [setting(t, k, q) for t in exact]
    errors = []
    for (r, v), (chains, steps) in zip(plan, spectra):
        dropped = [sum(chain[rank // s:]) if chain is not None else 0.0 for chain, s, rank in zip(chains, steps, r + v)]
        errors.append(tuple(max(0.0, sum(dropped[3 * side:3 * side + 3])) ** 0.5 for side in (0, 1)))
    n_params, n_kv = cost(k, q)
    return RankPlan(list(layers), [r for r, _ in plan], [v for _, v in plan], None, n_params, source_params, n_kv,
                    source_kv, errors, f"one setting for every layer (r3 = {k}, r2 = {q})")


def _hosvd_error(factors, ranks) -> float:
    norm = float(factors.norm_squared())
    core = factored_hosvd(factors, ranks).core
    return max(0.0, 1.0 - float(core.square().sum()) / norm) ** 0.5 if norm > 0 else 0.0


#: The methods :func:`plan_setting` plans (one setting for every layer, by the cost of the layer it builds).
SETTING_METHODS = MethodNames(lambda method: method.build is not None and method.valid is not None)


@dataclass
class SettingPlan:
    """One GQA / MLA setting for every layer under a budget (:func:`plan_setting`), with its cost.

    setting: n_kv_heads (gqa); kv_rank (mla, full-rank queries) or (kv_rank, q_rank) when a query
    latent is needed to stay within the parameter limit. ``budget``/``limit``: the budget that sets
    the setting; ``limits``: every limit that held ({'params': .., 'kv': ..}). ``valid``: every valid
    n_kv_heads / kv_rank (ascending).
    """
    method: str
    setting: int | tuple[int, int]
    budget: str
    limit: int
    params: int
    source_params: int
    kv: int
    source_kv: int
    valid: list[int] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)

    @property
    def pair(self) -> tuple:
        """(setting, None): what ``convert`` takes (ranks, value_ranks)."""
        return self.setting, None

    def label(self) -> str:
        return conversion_method(self.method).label(self.setting)

    def table(self) -> str:
        held = (" and ".join(f"{name} {limit:,}" for name, limit in self.limits.items())
                or f"{self.budget} {self.limit:,}")
        return (f"{self.method} {self.label()} (largest within {held}): attention "
                f"params {self.params:,} of {self.source_params:,} ({self.params / self.source_params:.3f}), "
                f"KV floats/token {self.kv:,} of {self.source_kv:,} ({self.kv / self.source_kv:.3f})")


def converted_cost(layer: Attention, method: str, setting) -> tuple[int, int]:
    """(parameters, KV floats per token) of the layer that converting ``layer`` to ``method``
    with ``setting`` builds (``convert_layer`` / ``tucker_attention.hf.convert``: the SVD baselines
    keep the source's head width and biases; RoPE sources get the method's positional RoPE, and a
    head-RoPE source's MLA has down-projection biases when it has biases, :func:`.rope.rope_mla`).

    Counted on a layer built on the meta device, with the layers' own accounting
    (parameters, ``cache_spec()``; the method's ``build``). gqa: setting = n_kv_heads; mla: kv_rank or
    (kv_rank, q_rank).
    Raises ValueError for a setting such a layer cannot have (e.g. n_kv_heads not dividing
    n_heads, an odd kv_rank under latent RoPE).
    """
    check_choice("method", method, SETTING_METHODS)
    with torch.device("meta"):
        target = conversion_method(method).build(layer, setting)
    return (sum(p.numel() for p in target.parameters()),
            sum(h * w for h, w in target.cache_spec().values()))


def _signature(layer: Attention) -> tuple:
    config = layer.config()
    return (layer.d_model, layer.n_heads, getattr(layer, "head_dim", None), bool(config.get("bias", False)),
            layer.rope)


def plan_setting(layers: dict[str, Attention], method: str, *, params=None, kv=None,
                 query_latent: bool = False) -> SettingPlan:
    """The largest GQA n_kv_heads (dividing every layer's n_heads) or MLA kv_rank (even when a
    layer uses RoPE: latent RoPE rotates pairs; up to 2 d_model for head-RoPE sources, whose key
    pairs and value directions it holds) whose total cost over ``layers`` fits: give one or both of
    ``params`` (attention parameters) and ``kv`` (KV-cache floats per token, all layers), each a
    count or a fraction in (0, 1] of the source layers' total. For MLA with ``query_latent``, when a
    kv_rank fits the KV limit but full-rank queries exceed the parameter limit, the largest query
    latent (q_rank) that fits is taken: the setting is then (kv_rank, q_rank) (how a KV budget is
    met without more parameters than the source).

    One setting for every layer (what ``convert(model, method, setting)`` takes). Costs are those
    of the converted layers (:func:`converted_cost`). Raises ValueError naming the budget and the
    smallest setting's cost when no setting fits.
    """
    check_choice("method", method, SETTING_METHODS)
    if params is None and kv is None:
        raise ValueError("give a budget: params=... (attention parameters) and/or kv=... (KV floats per token)")
    if not layers:
        raise ValueError("layers is empty: no attention layers to plan a setting for")
    items = list(layers.values())
    source_params, source_kv = _source_totals(layers)
    limits = _limits(params, kv, source_params, source_kv)
    groups: dict[tuple, list[Attention]] = {}
    for layer in items:                                      # identical layers cost the same: count one per shape
        groups.setdefault(_signature(layer), []).append(layer)
    record = conversion_method(method)
    d = min(layer.d_model for layer in items)
    valid = record.valid(items)
    second = 2 in record.counts                              # a second integer (MLA's q_rank) may be added

    def cost(setting) -> tuple[int, int]:
        totals = [0, 0]
        for members in groups.values():
            n_params, n_kv = converted_cost(members[0], method, setting)
            totals[0] += n_params * len(members)
            totals[1] += n_kv * len(members)
        return totals[0], totals[1]

    def fitting(setting):
        """The setting (with a query latent if MLA needs one to fit the parameter limit) or None."""
        n_params, n_kv = cost(setting)
        if limits[1] is not None and n_kv > limits[1]:
            return None
        if limits[0] is None or n_params <= limits[0]:
            return setting
        if not second or not query_latent or cost((setting, 1))[0] > limits[0]:
            return None
        low, high = 1, d                                     # the largest q_rank within the parameter limit
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost((setting, mid))[0] <= limits[0] else (low, mid - 1)
        return setting, low

    if fitting(valid[0]) is None:
        smallest = cost((valid[0], 1) if second else valid[0])
        name, limit, minimum = next((n, lim, c) for n, lim, c in zip(BUDGETS, limits, smallest)
                                    if lim is not None and c > lim)
        what = record.names[0]
        total = source_params if name == "params" else source_kv
        raise ValueError(f"{name} budget {limit:,} is below the smallest {method} setting's {minimum:,} "
                         f"({what}={valid[0]}: {minimum / total:.4f} of the source's {total:,})")
    low, high = 0, len(valid) - 1                            # costs grow with the setting: bisect the valid list
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fitting(valid[mid]) is not None else (low, mid - 1)
    setting = fitting(valid[low])
    n_params, n_kv = cost(setting)
    held = {name: limit for name, limit in zip(BUDGETS, limits) if limit is not None}
    name = "kv" if kv is not None else "params"
    return SettingPlan(method, setting, name, held[name], n_params, source_params, n_kv, source_kv, valid, held)


__all__ = ["BUDGETS", "SETTING_METHODS", "RankPlan", "SettingPlan", "allocate_ranks", "converted_cost", "layer_cost",
           "plan_ranks", "plan_setting", "plan_uniform", "tucker_param_count"]
