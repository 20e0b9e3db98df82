"""Which ranks does a layer's attention really use? (PAPER.md §7, rank study)

For every attention layer: the singular values of each unfolding of W and W_tilde (from
the per-head factors, no h x d x d tensor), the energy ranks holding 90 % / 99 % of the
squared spectrum, and the numerical multilinear ranks (singular values above rtol * max).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._table import text_table
from ..layers import Attention
from ..tensors import attention_factors, energy_rank, numerical_rank

ENERGIES = (0.9, 0.99)


def rank_report(layers: dict[str, Attention], *, rtol: float = 1e-6, energies=ENERGIES) -> list[dict]:
    """One record per (layer, tensor): name, method, tensor ('W' | 'W_tilde'), dims, spectra,
    ``energy_ranks`` {energy: (r1, r2, r3)} and ``numerical_ranks`` (r1, r2, r3).

    RoPE layers are read at offset 0 (their weights), which is what their ranks describe.
    """
    records = []
    for name, layer in layers.items():
        factors = attention_factors(layer, ignore_rope=True)
        for tensor, head_factors in (("W", factors.pre), ("W_tilde", factors.post)):
            spectra = head_factors.spectra()
            records.append({
                "name": name or "<root>", "method": layer.method, "tensor": tensor,
                "dims": head_factors.shape, "rope": layer.rope is not None,
                "spectra": [s.tolist() for s in spectra],
                "energy_ranks": {e: tuple(energy_rank(s, e) for s in spectra) for e in energies},
                "numerical_ranks": tuple(numerical_rank(s, rtol) for s in spectra),
            })
    return records


def format_rank_table(records: list[dict]) -> str:
    """Plain-text table: one row per (layer, tensor); ranks as (head, row side, column side)."""
    energies = list(records[0]["energy_ranks"]) if records else list(ENERGIES)
    fmt = lambda ranks: "(" + ", ".join(map(str, ranks)) + ")"  # noqa: E731
    head = ["layer", "method", "tensor", "dims", *(f"{e:.0%} energy" for e in energies), "numerical"]
    rows = [[r["name"], r["method"], r["tensor"], fmt(r["dims"]), *(fmt(r["energy_ranks"][e]) for e in energies),
             fmt(r["numerical_ranks"])] for r in records]
    return text_table(head, rows)


def plot_spectra(records: list[dict], path: str | Path) -> Path:
    """PNG: normalized singular values (log scale) of modes 1-3 of W (top) and W_tilde (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    titles = {"W": ["W mode 1 (heads)", "W mode 2 (query side)", "W mode 3 (key side)"],
              "W_tilde": ["W~ mode 1 (heads)", "W~ mode 2 (output side)", "W~ mode 3 (value side)"]}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for row, tensor in enumerate(("W", "W_tilde")):
        for mode in range(3):
            ax = axes[row][mode]
            for r in (r for r in records if r["tensor"] == tensor):
                s = torch.tensor(r["spectra"][mode])
                ax.semilogy(range(1, len(s) + 1), (s / s.max()).clamp(min=1e-12).tolist(), label=r["name"], lw=1)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(titles[tensor][mode], fontsize=10)
            ax.set_xlabel("index")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("singular value / largest")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle("Mode spectra of the attention tensors")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
