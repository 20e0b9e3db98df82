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

from dataclasses import dataclass, field

from .._table import text_table
from ..layers import Attention
from .algebra import energy_rank
from .view import attention_factors, factored_hosvd

BUDGETS = ("params", "kv")


def tucker_param_count(n_heads: int, d_model: int, ranks, value_ranks, *, bias: bool) -> int:
    """Parameters of a TuckerAttention with these ranks (separate key and value latents)."""
    (r1, r2, r3), (v1, v2, v3) = ranks, value_ranks
    count = r1 * r2 * r3 + n_heads * r1 + d_model * (r2 + r3) + v1 * v2 * v3 + n_heads * v1 + d_model * (v2 + v3)
    return count + (n_heads * r3 + d_model if bias else 0)


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
        raise ValueError(f"{name} must be a positive count or a fraction in (0, 1) of the source's, got {value!r}")
    return int(value * source) if isinstance(value, float) and value < 1 else int(value)


def plan_ranks(layers: dict[str, Attention], *, params=None, kv=None, even_r3: bool | None = None) -> RankPlan:
    """Ranks per layer under a budget: give exactly one of

    params: total attention parameters (an int, or a float in (0, 1): that fraction of the
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


__all__ = ["BUDGETS", "RankPlan", "plan_ranks", "tucker_param_count"]
