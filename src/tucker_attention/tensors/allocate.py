"""Truncating Tucker layers to a budget, layer by layer: what a setting costs
(:func:`tucker_param_count`, :func:`layer_cost`) and the greedy per-mode allocation
(:func:`allocate_ranks`) on the layers' mode spectra. Whole-model plans (energy level, uniform,
GQA/MLA settings) are in :mod:`.budget`.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from ..layers import TuckerAttention


def tucker_param_count(n_heads: int, d_model: int, ranks, value_ranks, *, bias: bool, shared_kv: bool = False,
                       key_bias: bool = False, qk_norm: bool = False) -> int:
    """Parameters of a TuckerAttention with these ranks (``shared_kv``: no U3~ of its own; ``key_bias``:
    the latent key bias a layer with ``bias`` has under RoPE or q/k norms; ``qk_norm``: two gains of r3)."""
    (r1, r2, r3), (v1, v2, v3) = ranks, value_ranks
    count = r1 * r2 * r3 + n_heads * r1 + d_model * (r2 + r3) + v1 * v2 * v3 + n_heads * v1 + d_model * v2
    return (count + (0 if shared_kv else d_model * v3) + (n_heads * r3 + d_model if bias else 0)
            + (r3 if key_bias else 0) + (2 * r3 if qk_norm else 0))


def layer_cost(layer: TuckerAttention, ranks, value_ranks) -> tuple[int, int]:
    """(parameters, KV-cache floats per token) of ``layer`` at ``ranks`` / ``value_ranks``: what
    ``layer.truncated(ranks, value_ranks)`` holds (its bias, RoPE and ``shared_kv`` as ``layer``'s)."""
    params = tucker_param_count(layer.n_heads, layer.d_model, ranks, value_ranks, bias=layer.q_bias is not None,
                                shared_kv=layer.shared_kv, key_bias=layer.k_bias is not None,
                                qk_norm=layer.q_norm is not None)
    return params, ranks[2] + (0 if layer.shared_kv else value_ranks[2])


#: Relative energies s^2 / ||T||^2 at or below this are numerical zero (s <= 1e-6 ||T||; spectra come from
#: Gram eigenvalues, accurate to ~1e-15 of ||T||^2).
NEGLIGIBLE_ENERGY = 1e-12


def energy_chains(layer: TuckerAttention, rope_pairs: bool = False) -> tuple[list[list[float] | None], list[int]]:
    """(chains, steps): relative energies s_k[j]^2 / ||T||^2 of the 6 modes (W modes 1-3, W_tilde modes
    1-3), None when fixed, and the rank step of each. A joint mode 3 (``shared_kv`` without RoPE) sits
    at index 2 with 2 s^2 / (||W||^2 + ||W~||^2), so its energies sum to 2 like the two modes it serves;
    index 5 is then None (tied to index 2). With ``rope_pairs`` a RoPE key latent is a chain of its
    pairs' relative energies (:meth:`TuckerAttention.pair_spectrum`, joint when shared) with step 2."""
    spectra = layer.mode_spectra()
    norms = [float(spectra[side][0].square().sum()) for side in ("ranks", "value_ranks")]
    chains, steps = [], [1] * 6
    for side, norm in zip(("ranks", "value_ranks"), norms):
        for s in spectra[side]:
            chains.append(None if s is None else (s.square() / norm if norm > 0 else 0 * s).tolist())
    if layer.shared_kv and layer.rope is None:
        total = sum(norms)
        chains[2] = (2 * spectra["ranks"][2].square() / total if total > 0 else 0 * spectra["ranks"][2]).tolist()
        chains[5] = None
    if rope_pairs and layer.rope is not None and layer.nonlinearity() is None:   # q/k norms keep r3
        energies = layer.pair_spectrum()
        total = float(energies.sum())
        scale = (2.0 if layer.shared_kv else 1.0) / total if total > 0 else 0.0
        chains[2], steps[2] = (energies * scale).tolist(), 2
    return chains, steps


def allocate_ranks(layers, *, params: int | None = None, kv: int | None = None,
                   rope_pairs: bool = False, chains=None) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Per-layer (ranks, value_ranks) for truncating Tucker layers (``layer.truncated``) to a budget.

    layers: TuckerAttention layers (a sequence, or a dict's values in order). Give one or both of
    params: total parameters of the truncated layers, and kv: their total KV-cache floats per token
    (sum of ``cache_spec()`` widths), absolute ints (:func:`layer_cost` counts a setting).

    Greedy water-filling on the spectra of :meth:`TuckerAttention.mode_spectra`: every mode starts at
    rank 1 (a mode reported None at its current rank; with ``shared_kv`` r3 == r3~ move together),
    then the (layer, side, mode) increment with the largest relative energy s_k[r]^2 / ||T||^2 per
    unit of added cost is taken, among those that keep the totals within the budgets and add energy
    above :data:`NEGLIGIBLE_ENERGY`, until none fits. Ranks never exceed the current ones. With a kv
    budget alone only the modes 3 cost anything: modes 1 and 2 stay at their current ranks. With both
    budgets every mode starts low and an increment's cost is the sum of its shares of the two budgets.
    ``rope_pairs``: a RoPE key latent (fixed in :meth:`~TuckerAttention.mode_spectra`) is allocated too,
    a pair at a time (:meth:`TuckerAttention.pair_spectrum`; what ``truncated`` keeps). Ties go to the
    earlier layer, then W before W_tilde, then the lower mode. As a larger budget first differs by
    taking an increment the smaller one could not afford, and every later increment has a lower
    ratio, the kept energy never decreases with the budget.

    chains: the layers' :func:`energy_chains` when already taken (then the layers are only read for
    their structure: they may be on the meta device).

    Raises ValueError when even the smallest setting exceeds a budget.
    """
    layers, limits = _allocation_inputs(layers, params, kv)
    chains, steps = zip(*(chains or [energy_chains(layer, rope_pairs) for layer in layers]))
    current = [list(layer.ranks) + list(layer.value_ranks) for layer in layers]
    state = [_lowest_ranks(layer, c, s, now, params is not None)   # per layer: [r1, r2, r3, r1~, r2~, r3~]
             for layer, c, s, now in zip(layers, chains, steps, current)]

    def cost(i: int, r: list[int]) -> tuple[int, int]:
        return layer_cost(layers[i], tuple(r[:3]), tuple(r[3:]))

    def raised(i: int, k: int) -> list[int]:
        r = list(state[i])
        r[k] += steps[i][k]
        if k == 2 and layers[i].shared_kv:
            r[5] = r[2]
        return r

    def weight(delta: tuple[int, int]) -> float:
        return sum(d / limit for d, limit in zip(delta, limits) if limit is not None)

    costs = [cost(i, r) for i, r in enumerate(state)]
    totals = [sum(c[j] for c in costs) for j in range(2)]
    _check_smallest(totals, limits)
    heap, version, dead = [], [0] * len(layers), set()

    def push(i: int) -> None:
        for k, chain in enumerate(chains[i]):
            r = state[i][k]
            if chain is None or r >= current[i][k] or (i, k) in dead:
                continue
            energy = chain[r // steps[i][k]]
            if energy > NEGLIGIBLE_ENERGY:
                new = cost(i, raised(i, k))
                delta = (new[0] - costs[i][0], new[1] - costs[i][1])
                heapq.heappush(heap, (-energy / max(weight(delta), 1e-300), i, k, version[i], delta))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i, k, seen, delta = heapq.heappop(heap)
        if seen != version[i]:
            continue                                                  # stale: layer i changed since
        if any(limit is not None and total + d > limit for total, d, limit in zip(totals, delta, limits)):
            dead.add((i, k))                                          # costs only grow: it never fits again
            continue
        state[i] = raised(i, k)
        costs[i] = (costs[i][0] + delta[0], costs[i][1] + delta[1])
        totals = [totals[0] + delta[0], totals[1] + delta[1]]
        version[i] += 1
        push(i)
    return [(tuple(r[:3]), tuple(r[3:])) for r in state]


def _allocation_inputs(layers, params, kv) -> tuple[list, list[int | None]]:
    """(the layers as a list, [params limit, kv limit] with None where not given), checked."""
    budgets = {name: value for name, value in (("params", params), ("kv", kv)) if value is not None}
    if not budgets:
        raise ValueError("give a budget: params=... (attention parameters) and/or kv=... (KV floats per token)")
    for name, budget in budgets.items():
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"{name} must be a positive int (an absolute count), got {budget!r}")
    layers = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    if not layers:
        raise ValueError("layers is empty: no Tucker layers to allocate ranks for")
    for i, layer in enumerate(layers):
        if not (hasattr(layer, "mode_spectra") and hasattr(layer, "truncated")):  # the layer owns its truncation
            raise TypeError(f"layers[{i}] must be a layer with mode_spectra() and truncated() (a TuckerAttention), "
                            f"got {type(layer).__name__}")
    return layers, [budgets.get("params"), budgets.get("kv")]


def _lowest_ranks(layer: TuckerAttention, chains, steps: list[int], now: list[int], all_modes: bool) -> list[int]:
    """The starting [r1, r2, r3, r1~, r2~, r3~] of :func:`allocate_ranks`: one step in every mode it
    allocates (all modes with ``all_modes`` (a params budget), else modes 3 only), ``now`` elsewhere."""
    low = [steps[k] if chain is not None and (all_modes or k % 3 == 2) else now[k] for k, chain in enumerate(chains)]
    if layer.shared_kv:
        low[5] = low[2]                                               # one latent: r3~ == r3
    return low


def _check_smallest(totals: list[int], limits: list[int | None]) -> None:
    """Raise ValueError when the starting setting's [params, kv] ``totals`` exceed a limit."""
    for j, name in enumerate(("params", "kv")):
        if limits[j] is not None and totals[j] > limits[j]:
            raise ValueError(f"{name} budget {limits[j]:,} is below the smallest setting's {totals[j]:,} (rank 1 in "
                             f"every mode that can be truncated)")
