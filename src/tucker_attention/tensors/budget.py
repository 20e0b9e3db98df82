"""Choosing Tucker ranks per layer for a parameter or KV-cache budget.

Every layer's ranks come from one shared energy level e: in each mode of W and W_tilde the
smallest rank holding a fraction e of the squared spectrum (PAPER.md §7). Layers whose
weights concentrate their energy get small ranks, the others larger ones. e is the largest
level (found by bisection) whose total cost fits the budget. The reported error of a layer
is the relative Frobenius error of its truncated HOSVD, ||T - T_hat|| / ||T|| for T = W and
W_tilde (exact: the truncation is an orthogonal projection, so ||T - T_hat||^2 = ||T||^2 -
||core||^2).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .._checks import check_choice
from .._table import text_table
from ..layers import Attention, TuckerAttention, make_attention
from .algebra import energy_rank
from .view import attention_factors, factored_hosvd

BUDGETS = ("params", "kv")


def tucker_param_count(n_heads: int, d_model: int, ranks, value_ranks, *, bias: bool, shared_kv: bool = False) -> int:
    """Parameters of a TuckerAttention with these ranks (``shared_kv``: no U3~ of its own)."""
    (r1, r2, r3), (v1, v2, v3) = ranks, value_ranks
    count = r1 * r2 * r3 + n_heads * r1 + d_model * (r2 + r3) + v1 * v2 * v3 + n_heads * v1 + d_model * v2
    return count + (0 if shared_kv else d_model * v3) + (n_heads * r3 + d_model if bias else 0)


@dataclass
class RankPlan:
    """Ranks per layer for :func:`tucker_attention.hf.convert` (``ranks=plan.ranks,
    value_ranks=plan.value_ranks``) or ``compress``, with what they cost and lose."""
    paths: list[str]
    ranks: list[tuple[int, int, int]]
    value_ranks: list[tuple[int, int, int]]
    energy: float
    params: int
    source_params: int
    kv: int
    source_kv: int
    errors: list[tuple[float, float]] = field(default_factory=list)

    def table(self) -> str:
        """Per-layer ranks and relative errors, then the totals."""
        rows = [[p, str(r), str(v), f"{e[0]:.4f}", f"{e[1]:.4f}"]
                for p, r, v, e in zip(self.paths, self.ranks, self.value_ranks, self.errors)]
        head = ["layer", "ranks W", "ranks W~", "rel. err W", "rel. err W~"]
        totals = (f"energy level {self.energy:.4f}: attention params {self.params:,} of {self.source_params:,} "
                  f"({self.params / self.source_params:.3f}), KV floats/token {self.kv:,} of {self.source_kv:,} "
                  f"({self.kv / self.source_kv:.3f})")
        return text_table(head, rows) + "\n" + totals


def _budget_value(name: str, value, source: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive count (int) or a fraction in (0, 1] (float) of the source's, "
                         f"got {value!r}")
    return int(value * source) if isinstance(value, float) and value <= 1 else int(value)


def plan_ranks(layers: dict[str, Attention], *, params=None, kv=None, even_r3: bool | None = None) -> RankPlan:
    """Ranks per layer under a budget: give exactly one of

    params: total attention parameters (an int, or a float in (0, 1]: that fraction of the
        source layers' parameters);
    kv: total KV-cache floats per token over all layers (r3 + r3~ per layer), int or fraction.

    even_r3: round r3 up to even (needed for latent RoPE); default: when a source uses RoPE.
    Raises ValueError when even ranks (1, 1, 1) everywhere exceed the budget.
    """
    if (params is None) == (kv is None):
        raise ValueError("give exactly one budget: params=... (attention parameters) or kv=... (KV floats per token)")
    if not layers:
        raise ValueError("layers is empty: no attention layers to plan ranks for")
    items = list(layers.items())
    facts = []
    for _, layer in items:
        f = attention_factors(layer, ignore_rope=True)
        facts.append((f, f.pre.spectra(), f.post.spectra(), f.out_bias is not None,
                      layer.rope is not None if even_r3 is None else even_r3))
    source_params = sum(sum(p.numel() for p in layer.parameters()) for _, layer in items)
    source_kv = sum(sum(h * w for h, w in layer.cache_spec().values()) for _, layer in items)
    name, total = ("params", source_params) if params is not None else ("kv", source_kv)
    limit = _budget_value(name, params if params is not None else kv, total)

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
        return cost(plan)[0 if name == "params" else 1] <= limit

    low, high = 1e-9, 1.0
    if not fits(ranks_at(low)):
        minimum = cost(ranks_at(low))[0 if name == "params" else 1]
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


def _hosvd_error(factors, ranks) -> float:
    norm = float(factors.norm_squared())
    core = factored_hosvd(factors, ranks).core
    return max(0.0, 1.0 - float(core.square().sum()) / norm) ** 0.5 if norm > 0 else 0.0


SETTING_METHODS = ("gqa", "mla")


@dataclass
class SettingPlan:
    """One GQA / MLA setting for every layer under a budget (:func:`plan_setting`), with its cost.

    setting: n_kv_heads (gqa) or kv_rank (mla; queries stay full rank). ``smallest`` is the
    cost of the smallest valid setting, ``valid`` every valid setting (ascending).
    """
    method: str
    setting: int
    budget: str
    limit: int
    params: int
    source_params: int
    kv: int
    source_kv: int
    valid: list[int] = field(default_factory=list)

    def label(self) -> str:
        return f"{'n_kv_heads' if self.method == 'gqa' else 'kv_rank'} {self.setting}"

    def table(self) -> str:
        return (f"{self.method} {self.label()} (largest within the {self.budget} budget {self.limit:,}): attention "
                f"params {self.params:,} of {self.source_params:,} ({self.params / self.source_params:.3f}), "
                f"KV floats/token {self.kv:,} of {self.source_kv:,} ({self.kv / self.source_kv:.3f})")


def converted_cost(layer: Attention, method: str, setting) -> tuple[int, int]:
    """(parameters, KV floats per token) of the layer that converting ``layer`` to ``method``
    with ``setting`` builds (``convert_layer`` / ``tucker_attention.hf.convert``: the SVD baselines
    keep the source's head width and biases; RoPE sources get the method's positional RoPE).

    Counted on a layer built on the meta device, with the layers' own accounting
    (parameters, ``cache_spec()``). gqa: setting = n_kv_heads; mla: kv_rank or (kv_rank, q_rank).
    Raises ValueError for a setting such a layer cannot have (e.g. n_kv_heads not dividing
    n_heads, an odd kv_rank under latent RoPE).
    """
    check_choice("method", method, SETTING_METHODS)
    config = layer.config()
    common = {"head_dim": getattr(layer, "head_dim", None), "bias": bool(config.get("bias", False)),
              "rope": True if layer.rope is not None else None, "causal": layer.causal}
    with torch.device("meta"):
        if method == "gqa":
            target = make_attention("gqa", layer.d_model, layer.n_heads, n_kv_heads=setting, **common)
        else:
            kv_rank, q_rank = tuple(setting) if isinstance(setting, (tuple, list)) else (setting, None)
            target = make_attention("mla", layer.d_model, layer.n_heads, kv_rank=kv_rank, q_rank=q_rank, **common)
    return (sum(p.numel() for p in target.parameters()),
            sum(h * w for h, w in target.cache_spec().values()))


def _signature(layer: Attention) -> tuple:
    config = layer.config()
    return (layer.d_model, layer.n_heads, getattr(layer, "head_dim", None), bool(config.get("bias", False)),
            layer.rope is not None)


def plan_setting(layers: dict[str, Attention], method: str, *, params=None, kv=None) -> SettingPlan:
    """The largest GQA n_kv_heads (dividing every layer's n_heads) or MLA kv_rank (even when a
    layer uses RoPE: latent RoPE rotates pairs) whose total cost over ``layers`` fits a budget:
    give exactly one of ``params`` (attention parameters) or ``kv`` (KV-cache floats per token,
    all layers), each a count or a fraction in (0, 1) of the source layers' total.

    One setting for every layer (what ``convert(model, method, setting)`` takes). Costs are those
    of the converted layers (:func:`converted_cost`). Raises ValueError naming the budget and the
    smallest setting's cost when no setting fits.
    """
    check_choice("method", method, SETTING_METHODS)
    if (params is None) == (kv is None):
        raise ValueError("give exactly one budget: params=... (attention parameters) or kv=... (KV floats per token)")
    if not layers:
        raise ValueError("layers is empty: no attention layers to plan a setting for")
    items = list(layers.values())
    source_params = sum(sum(p.numel() for p in layer.parameters()) for layer in items)
    source_kv = sum(sum(h * w for h, w in layer.cache_spec().values()) for layer in items)
    name, total = ("params", source_params) if params is not None else ("kv", source_kv)
    limit = _budget_value(name, params if params is not None else kv, total)
    groups: dict[tuple, list[Attention]] = {}
    for layer in items:                                      # identical layers cost the same: count one per shape
        groups.setdefault(_signature(layer), []).append(layer)
    if method == "gqa":
        valid = [g for g in range(1, min(layer.n_heads for layer in items) + 1)
                 if all(layer.n_heads % g == 0 for layer in items)]
    else:
        step = 2 if any(layer.rope is not None for layer in items) else 1
        valid = list(range(step, min(layer.d_model for layer in items) + 1, step))

    def cost(setting) -> tuple[int, int]:
        totals = [0, 0]
        for members in groups.values():
            n_params, n_kv = converted_cost(members[0], method, setting)
            totals[0] += n_params * len(members)
            totals[1] += n_kv * len(members)
        return totals[0], totals[1]

    def fits(setting) -> bool:
        return cost(setting)[0 if name == "params" else 1] <= limit

    if not fits(valid[0]):
        minimum = cost(valid[0])[0 if name == "params" else 1]
        what = "n_kv_heads" if method == "gqa" else "kv_rank"
        raise ValueError(f"{name} budget {limit:,} is below the smallest {method} setting's {minimum:,} "
                         f"({what}={valid[0]}: {minimum / total:.4f} of the source's {total:,})")
    low, high = 0, len(valid) - 1                            # costs grow with the setting: bisect the valid list
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(valid[mid]) else (low, mid - 1)
    n_params, n_kv = cost(valid[low])
    return SettingPlan(method, valid[low], name, limit, n_params, source_params, n_kv, source_kv, valid)



def layer_cost(layer: TuckerAttention, ranks, value_ranks) -> tuple[int, int]:
    """(parameters, KV-cache floats per token) of ``layer`` at ``ranks`` / ``value_ranks``: what
    ``layer.truncated(ranks, value_ranks)`` holds (its bias and ``shared_kv`` as ``layer``'s)."""
    params = tucker_param_count(layer.n_heads, layer.d_model, ranks, value_ranks, bias=layer.q_bias is not None,
                                shared_kv=layer.shared_kv)
    return params, ranks[2] + (0 if layer.shared_kv else value_ranks[2])


#: Relative energies s^2 / ||T||^2 at or below this are numerical zero (s <= 1e-6 ||T||; spectra come from
#: Gram eigenvalues, accurate to ~1e-15 of ||T||^2).
NEGLIGIBLE_ENERGY = 1e-12


def _energy_chains(layer: TuckerAttention) -> list[list[float] | None]:
    """Relative energies s_k[j]^2 / ||T||^2 of the 6 modes (W modes 1-3, W_tilde modes 1-3), None when
    fixed. A joint mode 3 (``shared_kv`` without RoPE) sits at index 2 with 2 s^2 / (||W||^2 + ||W~||^2),
    so its energies sum to 2 like the two modes it serves; index 5 is then None (tied to index 2)."""
    spectra = layer.mode_spectra()
    norms = [float(spectra[side][0].square().sum()) for side in ("ranks", "value_ranks")]
    chains = []
    for side, norm in zip(("ranks", "value_ranks"), norms):
        for s in spectra[side]:
            chains.append(None if s is None else (s.square() / norm if norm > 0 else 0 * s).tolist())
    if layer.shared_kv and layer.rope is None:
        total = sum(norms)
        chains[2] = (2 * spectra["ranks"][2].square() / total if total > 0 else 0 * spectra["ranks"][2]).tolist()
        chains[5] = None
    return chains


def allocate_ranks(layers, *, params: int | None = None,
                   kv: int | None = None) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Per-layer (ranks, value_ranks) for truncating Tucker layers (``layer.truncated``) to one budget.

    layers: TuckerAttention layers (a sequence, or a dict's values in order). Give exactly one of
    params: total parameters of the truncated layers, or kv: their total KV-cache floats per token
    (sum of ``cache_spec()`` widths), both absolute ints (:func:`layer_cost` counts a setting).

    Greedy water-filling on the spectra of :meth:`TuckerAttention.mode_spectra`: every mode starts at
    rank 1 (a mode reported None at its current rank; with ``shared_kv`` r3 == r3~ move together),
    then the (layer, side, mode) increment with the largest relative energy s_k[r]^2 / ||T||^2 per
    unit of added cost is taken, among those that keep the total within the budget and add energy
    above :data:`NEGLIGIBLE_ENERGY`, until none fits. Ranks never exceed the current ones. With a kv
    budget only the modes 3 cost anything: modes 1 and 2 stay at their current ranks. Ties go to the
    earlier layer, then W before W_tilde, then the lower mode. As a larger budget first differs by
    taking an increment the smaller one could not afford, and every later increment has a lower
    ratio, the kept energy never decreases with the budget.

    Raises ValueError when even the smallest setting exceeds the budget.
    """
    if (params is None) == (kv is None):
        raise ValueError("give exactly one budget: params=... (attention parameters) or kv=... (KV floats per token)")
    name, budget = ("params", params) if params is not None else ("kv", kv)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"{name} must be a positive int (an absolute count), got {budget!r}")
    layers = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    if not layers:
        raise ValueError("layers is empty: no Tucker layers to allocate ranks for")
    for i, layer in enumerate(layers):
        if not (hasattr(layer, "mode_spectra") and hasattr(layer, "truncated")):  # the layer owns its truncation
            raise TypeError(f"layers[{i}] must be a layer with mode_spectra() and truncated() (a TuckerAttention), "
                            f"got {type(layer).__name__}")
    which = 0 if name == "params" else 1
    chains = [_energy_chains(layer) for layer in layers]
    current = [list(layer.ranks) + list(layer.value_ranks) for layer in layers]
    state = []                                                        # per layer: (r1, r2, r3, r1~, r2~, r3~)
    for layer, layer_chains, now in zip(layers, chains, current):
        low = [1 if chain is not None and (name == "params" or k % 3 == 2) else now[k]
               for k, chain in enumerate(layer_chains)]
        if layer.shared_kv:
            low[5] = low[2]                                           # one latent: r3~ == r3
        state.append(low)

    def cost(i: int, r: list[int]) -> int:
        return layer_cost(layers[i], tuple(r[:3]), tuple(r[3:]))[which]

    def raised(i: int, k: int) -> list[int]:
        r = list(state[i])
        r[k] += 1
        if k == 2 and layers[i].shared_kv:
            r[5] += 1
        return r

    costs = [cost(i, r) for i, r in enumerate(state)]
    total = sum(costs)
    if total > budget:
        raise ValueError(f"{name} budget {budget:,} is below the smallest setting's {total:,} (rank 1 in every "
                         f"mode that can be truncated)")
    heap, version, dead = [], [0] * len(layers), set()

    def push(i: int) -> None:
        for k, chain in enumerate(chains[i]):
            r = state[i][k]
            if chain is None or r >= current[i][k] or (i, k) in dead:
                continue
            energy = chain[r]
            if energy > NEGLIGIBLE_ENERGY:
                delta = cost(i, raised(i, k)) - costs[i]
                heapq.heappush(heap, (-energy / delta, i, k, version[i], delta))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i, k, seen, delta = heapq.heappop(heap)
        if seen != version[i]:
            continue                                                  # stale: layer i changed since
        if total + delta > budget:
            dead.add((i, k))                                          # costs only grow: it never fits again
            continue
        state[i], costs[i], total = raised(i, k), costs[i] + delta, total + delta
        version[i] += 1
        push(i)
    return [(tuple(r[:3]), tuple(r[3:])) for r in state]


__all__ = ["BUDGETS", "SETTING_METHODS", "RankPlan", "SettingPlan", "allocate_ranks", "converted_cost", "layer_cost",
           "plan_ranks", "plan_setting", "tucker_param_count"]
