"""Rank-adaptive Tucker training: start larger, truncate to a budget while training.

A run with ``train.rank_budget_params`` (attention parameters) or ``train.rank_budget_kv`` (KV
floats per token, all layers), each a fraction (<= 1) of MHA's for the same shapes or a count,
trains a Tucker model whose spec gives no ranks. It starts at ``train.rank_start`` times the
budget (uniform ranks: r1 = r1~ = H, the other modes one width r, at most MHA's cost) and
truncates every layer ``train.rank_cuts`` times, at evenly spaced steps up to
``train.rank_until`` of the run, to budgets shrinking geometrically to the final one. Each cut
allocates per-layer, per-mode ranks by greedy water-filling on the layers' multilinear spectra
(:func:`~tucker_attention.tensors.budget.allocate_ranks`) and truncates each layer's small core
and factors by HOSVD (:meth:`~tucker_attention.layers.TuckerAttention.truncated`): progressive
truncation in the spirit of rank-adaptive dynamical low-rank training (Ceruti, Kusch & Lubich
2022; Zangrando et al., "Geometry-aware training of factorized layers in tensor Tucker format",
NeurIPS 2024), with a budget in place of a tolerance.

Under latent RoPE the key latent (mode 3 of W) is not truncated: RoPE rotates fixed pairs of its
coordinates with frequencies set by its width, so its rank r3 is fixed from the start at the
widest even r3 that the uniform final-budget setting allows.

Adam's moments of a truncated layer are reset at each cut: they are per-coordinate estimates in
the old bases, which the cut rotates and shortens; every other parameter keeps its state, and
the learning-rate scale of each parameter stays the one of the starting model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import make_attention
from ..models.blocks import attention_spec, layer_spec


def _cost(layer, kind: str) -> int:
    if kind == "params":
        return sum(p.numel() for p in layer.parameters())
    return sum(h * w for h, w in layer.cache_spec().values())


def _meta_layer(method: str, d_model: int, n_heads: int, **kwargs):
    with torch.device("meta"):
        return make_attention(method, d_model, n_heads, **kwargs)


@dataclass
class RankSchedule:
    """The cuts of a rank-adaptive run: ``cuts`` [(step, budget)], the last budget ``final``."""

    kind: str
    final: int
    reference: int  # MHA's cost for the same shapes (the fraction's base)
    cuts: list[tuple[int, int]]

    def budget_at(self, step: int) -> int | None:
        """The budget of the cut made after ``step``, or None."""
        return next((b for s, b in self.cuts if s == step), None)


def _budget(train) -> tuple[str, float] | None:
    given = [(k, v) for k, v in (("params", train.rank_budget_params), ("kv", train.rank_budget_kv)) if v is not None]
    if len(given) > 1:
        raise ValueError("give one rank budget: train.rank_budget_params or train.rank_budget_kv, not both")
    return given[0] if given else None


def adaptive(train) -> bool:
    return _budget(train) is not None


def starting_spec(spec, train, *, d_model: int, n_heads: int, n_layers: int, rope: bool, bias: bool) -> dict:
    """The attention spec a rank-adaptive run starts from (``spec`` with starting ranks), after
    checking the budget: a Tucker spec without ranks, a budget between the smallest Tucker
    setting's cost and MHA's. Returns ``spec`` normalized when no budget is set."""
    spec = attention_spec(spec, "model.attention")
    budget = _budget(train)
    if budget is None:
        return spec
    kind, value = budget
    if spec["method"] != "tucker":
        raise ValueError(f"train.rank_budget_{kind} trains Tucker ranks; model.attention.method must be 'tucker', "
                         f"got {spec['method']!r}")
    given = sorted({"ranks", "value_ranks"} & set(spec))
    if given:
        raise ValueError(f"train.rank_budget_{kind} chooses the ranks; drop model.attention.{'/'.join(given)}")
    if spec.get("shared_kv"):
        raise ValueError("rank-adaptive training needs separate key and value latents (model.attention.shared_kv "
                         "false); a shared latent takes fixed ranks")
    options = {k: v for k, v in spec.items() if k != "method"}
    options.setdefault("rope", "latent" if rope else None)
    options.setdefault("bias", bias)

    def layer(r: int, r3: int | None = None):
        r3 = r if r3 is None else r3
        return _meta_layer("tucker", d_model, n_heads, ranks=(n_heads, r, r3), value_ranks=(n_heads, r, r),
                           **options)

    final, reference = _targets(kind, value, d_model, n_heads, n_layers)
    smallest = n_layers * _cost(_meta_layer("tucker", d_model, n_heads, ranks=(1, 1, 2 if options["rope"] else 1),
                                            value_ranks=(1, 1, 1), **options), kind)
    if not smallest <= final <= reference:
        raise ValueError(f"train.rank_budget_{kind}={value} is {final:,} {_unit(kind)}; it must lie between the "
                         f"smallest Tucker setting's {smallest:,} (all ranks 1) and MHA's {reference:,}")
    step = 2 if options["rope"] else 1
    widths = list(range(step, d_model + 1, step))

    def widest(limit: int, r3: int | None = None) -> int:
        fitting = [r for r in widths if n_layers * _cost(layer(r, r3), kind) <= limit]
        return fitting[-1] if fitting else widths[0]

    r3 = widest(final) if options["rope"] else None       # fixed under RoPE: the final uniform setting's
    start = min(int(train.rank_start * final), reference)
    r = widest(start, r3)
    return {**spec, **options, "ranks": (n_heads, r, r3 or r), "value_ranks": (n_heads, r, r)}


def _targets(kind: str, value: float, d_model: int, n_heads: int, n_layers: int) -> tuple[int, int]:
    """(final budget, MHA's cost) in ``kind`` units: a fraction <= 1 of MHA's (no biases) or a count."""
    reference = n_layers * _cost(_meta_layer("mha", d_model, n_heads), kind)
    return (int(value * reference) if value <= 1 else int(value)), reference


def _unit(kind: str) -> str:
    return "attention parameters" if kind == "params" else "KV floats per token"


def schedule(train, model) -> RankSchedule | None:
    """The cuts of ``model`` (built from :func:`starting_spec`) under ``train``'s budget, or None."""
    budget = _budget(train)
    if budget is None:
        return None
    kind, value = budget
    final, reference = _targets(kind, value, model.config.d_model, model.config.n_heads, model.config.n_layers)
    start = sum(_cost(block.attn, kind) for block in model.blocks)
    last = max(1, round(train.rank_until * train.steps))
    cuts = []
    for j in range(1, train.rank_cuts + 1):
        step = max(1, round(j * last / train.rank_cuts))
        budget_j = final if j == train.rank_cuts else int(start * (final / start) ** (j / train.rank_cuts))
        if cuts and cuts[-1][0] == step:
            cuts[-1] = (step, budget_j)
        else:
            cuts.append((step, budget_j))
    return RankSchedule(kind, final, reference, cuts)


def cut(model, budget: int, kind: str) -> list[str]:
    """Truncate every block's Tucker layer to ranks allocated for ``budget`` (in place); update
    ``model.config.attention`` to the per-layer specs; return the names of the replaced parameters."""
    from ..tensors.budget import allocate_ranks

    layers = [block.attn for block in model.blocks]
    plan = allocate_ranks(layers, **{kind: budget})
    replaced = []
    for i, (block, (ranks, value_ranks)) in enumerate(zip(model.blocks, plan)):
        replaced += [f"blocks.{i}.attn.{name}" for name, _ in block.attn.named_parameters()]
        block.attn = block.attn.truncated(ranks, value_ranks)
    model.config.attention = [layer_spec(block.attn) for block in model.blocks]
    return replaced


def rank_record(model) -> dict:
    """The per-layer ranks and total cost of a model (a ``metrics.jsonl`` record's fields)."""
    layers = [block.attn for block in model.blocks]
    return {"ranks": [[list(layer.ranks), list(layer.value_ranks)] for layer in layers],
            "attention_params": sum(_cost(layer, "params") for layer in layers),
            "kv_floats_per_token": sum(_cost(layer, "kv") for layer in layers)}


def plot_ranks(records: list[dict], path) -> None:
    """Rank trajectory of a run (the ``ranks`` records of its metrics): each layer's r1..r3 and
    r1~..r3~ against the step, and the attention parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = ("r1", "r2", "r3")
    for layer in range(len(records[0]["ranks"])):
        for side, ax in enumerate(axes[:2]):
            for mode in range(3):
                ax.plot(steps, [r["ranks"][layer][side][mode] for r in records], marker=".",
                        label=f"layer {layer} {names[mode]}{'~' if side else ''}")
    axes[0].set_title("ranks of W (query-key)")
    axes[1].set_title("ranks of W~ (value-output)")
    axes[2].plot(steps, [r["attention_params"] for r in records], marker="o")
    axes[2].set_title("attention parameters")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
