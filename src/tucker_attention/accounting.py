"""Parameter and KV-cache accounting (PAPER.md §2, §6; the paper's Tables 1-3).

Counts come from real layers (:func:`attention_param_count`, :func:`kv_cache_floats_per_token`);
:func:`table1_param_count` / :func:`table1_kv_floats` are the paper's closed forms, kept as an
independent check. Presets reproduce Table 2 (GPT-2 small) and Table 3 (LLaMA3-1B-like).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import check_choice, check_int
from .layers import Attention, make_attention


def attention_param_count(layer: nn.Module) -> int:
    """Number of trainable scalars in an attention layer (or any module)."""
    return sum(p.numel() for p in layer.parameters())


def kv_cache_floats_per_token(layer: Attention) -> int:
    """Scalars one token leaves in this layer's KV cache (per sequence)."""
    if not isinstance(layer, Attention):
        raise TypeError(f"layer must be a tucker_attention Attention layer, got {type(layer).__name__}")
    return sum(heads * width for heads, width in layer.cache_spec().values())


def kv_cache_bytes_per_token(layer: Attention, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token leaves in this layer's KV cache when cached in ``dtype``."""
    return kv_cache_floats_per_token(layer) * torch.empty((), dtype=dtype).element_size()


def table1_param_count(method: str, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                       kv_rank: int | None = None, shared_kv: bool | None = None, ranks=None, value_ranks=None) -> int:
    """The paper's Table 1 closed forms (no biases; MLA with q_rank = kv_rank = d_c).

    MHA 4d^2; GQA 2d^2 + 2 n_kv d_h d (MQA: n_kv = 1); MLA d^2 + 5 d d_c (shared latent) or
    d^2 + 6 d d_c (separate); Tucker r1 r2 r3 + h r1 + d r2 + d r3 + the same for W_tilde
    (without its d r3~ when the latent is shared). ``shared_kv`` defaults to each layer's
    default: True for MLA, False for Tucker.
    """
    check_choice("method", method, ("mha", "gqa", "mqa", "mla", "tucker"))
    shared_kv = (method == "mla") if shared_kv is None else shared_kv
    d, h = d_model, n_heads
    if method == "mha":
        return 4 * d * d
    if method in ("gqa", "mqa"):
        return 2 * d * d + 2 * (1 if method == "mqa" else n_kv_heads) * (d // h) * d
    if method == "mla":
        return d * d + (5 if shared_kv else 6) * d * kv_rank
    (r1, r2, r3), (v1, v2, v3) = ranks, value_ranks or ranks
    return r1 * r2 * r3 + h * r1 + d * r2 + d * r3 + v1 * v2 * v3 + h * v1 + d * v2 + (0 if shared_kv else d * v3)


def table1_kv_floats(method: str, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                     kv_rank: int | None = None, shared_kv: bool | None = None, ranks=None, value_ranks=None) -> int:
    """Table 1's KV cache per token per layer: MHA 2d, GQA 2 n_kv d_h, MLA d_c, Tucker r3 + r3~."""
    check_choice("method", method, ("mha", "gqa", "mqa", "mla", "tucker"))
    shared_kv = (method == "mla") if shared_kv is None else shared_kv
    head_dim = d_model // n_heads
    if method == "mha":
        return 2 * d_model
    if method in ("gqa", "mqa"):
        return 2 * (1 if method == "mqa" else n_kv_heads) * head_dim
    if method == "mla":
        return kv_rank * (1 if shared_kv else 2)
    return ranks[2] if shared_kv else ranks[2] + (value_ranks or ranks)[2]


@dataclass(frozen=True)
class Row:
    """One line of a parameter table: a layer configuration and, if known, the paper's values."""
    label: str
    method: str
    kwargs: dict = field(default_factory=dict)
    paper_params_mb: float | None = None
    paper_kv_mb: float | None = None

    def table1_kwargs(self) -> dict:
        """The layer arguments that Table 1's closed forms take (q_rank is assumed = kv_rank)."""
        keys = ("n_kv_heads", "kv_rank", "shared_kv", "ranks", "value_ranks")
        return {k: v for k, v in self.kwargs.items() if k in keys}


@dataclass(frozen=True)
class Preset:
    """Model shape for whole-model accounting: ``n_layers`` attention layers at ``seq_len`` tokens."""
    d_model: int
    n_heads: int
    n_layers: int
    seq_len: int
    rows: tuple[Row, ...]


PRESETS: dict[str, Preset] = {
    # Table 2: GPT-2 small, BF16, MB = 1e6 bytes.
    "gpt2": Preset(768, 12, 12, 1024, (
        Row("MHA", "mha", {}, 56.62, 37.74),
        Row("GQA n_kv=4", "gqa", {"n_kv_heads": 4}, 37.74, 12.58),
        Row("GQA n_kv=2", "gqa", {"n_kv_heads": 2}, 33.02, 6.29),
        Row("MQA", "mqa", {}),
        Row("MLA d_c=128 (shared KV)", "mla", {"kv_rank": 128, "q_rank": 128}, 26.00, 3.14),
        Row("Tucker [8,128,128]", "tucker", {"ranks": (8, 128, 128)}, 15.74, 6.28),
        Row("Tucker [8,128,64]", "tucker", {"ranks": (8, 128, 64)}, 10.24, 3.14),
        Row("Tucker [8,64,64]", "tucker", {"ranks": (8, 64, 64)}, 6.31, 3.14),
    )),
    # Table 3: LLaMA3-1B-like, 8 attention layers as counted there. The paper's MLA row
    # (93.3 MB) matches neither closed form of its Table 1 exactly; the separate-latent form
    # (d^2 + 6 d d_c) is the nearest, 1.1 % below it.
    "llama3-1b": Preset(2048, 32, 8, 2048, (
        Row("MHA", "mha", {}, 268.0),
        Row("GQA n_kv=8", "gqa", {"n_kv_heads": 8}, 168.0),
        Row("MQA", "mqa", {}, 138.0),
        Row("MLA d_c=128 (shared KV)", "mla", {"kv_rank": 128, "q_rank": 128}),
        Row("MLA d_c=128 (separate K/V)", "mla", {"kv_rank": 128, "q_rank": 128, "shared_kv": False}, 93.3),
        Row("Tucker [32,128,128]", "tucker", {"ranks": (32, 128, 128)}, 33.5),
        Row("Tucker [32,128,64]", "tucker", {"ranks": (32, 128, 64)}, 21.0),
        Row("Tucker [32,64,64]", "tucker", {"ranks": (32, 64, 64)}, 12.6),
    )),
}


def custom_preset(d_model: int, n_heads: int, n_layers: int, seq_len: int, *, n_kv_heads=(), kv_ranks=(),
                  tucker_ranks=()) -> Preset:
    """A preset for any shape: MHA, MQA, and the given GQA / MLA / Tucker settings."""
    for name, value in (("d_model", d_model), ("n_heads", n_heads), ("n_layers", n_layers), ("seq_len", seq_len)):
        check_int(name, value)
    rows = [Row("MHA", "mha")]
    rows += [Row(f"GQA n_kv={g}", "gqa", {"n_kv_heads": g}) for g in n_kv_heads]
    rows += [Row("MQA", "mqa")]
    rows += [Row(f"MLA d_c={c} (shared KV)", "mla", {"kv_rank": c, "q_rank": c}) for c in kv_ranks]
    rows += [Row(f"Tucker [{','.join(map(str, r))}]", "tucker", {"ranks": tuple(r)}) for r in tucker_ranks]
    return Preset(d_model, n_heads, n_layers, seq_len, tuple(rows))


def attention_table(preset: Preset, *, bytes_per_scalar: int = 2) -> list[dict]:
    """Whole-model attention parameters and KV cache for every row, from instantiated layers.

    Layers are built on the meta device (no memory, no init cost) and counted. Each record:
    label, method, params (per layer), params_mb, kv_floats (per token per layer), kv_mb,
    table1_params, paper_params_mb, paper_kv_mb. MB = 1e6 bytes.
    """
    records = []
    for row in preset.rows:
        with torch.device("meta"):
            layer = make_attention(row.method, preset.d_model, preset.n_heads, **row.kwargs)
        params, kv = attention_param_count(layer), kv_cache_floats_per_token(layer)
        records.append({
            "label": row.label, "method": row.method, "params": params,
            "params_mb": params * preset.n_layers * bytes_per_scalar / 1e6,
            "kv_floats": kv, "kv_mb": kv * preset.n_layers * preset.seq_len * bytes_per_scalar / 1e6,
            "table1_params": table1_param_count(row.method, preset.d_model, preset.n_heads, **row.table1_kwargs()),
            "paper_params_mb": row.paper_params_mb, "paper_kv_mb": row.paper_kv_mb,
        })
    return records


def format_table(records: list[dict]) -> str:
    """Plain-text table of :func:`attention_table` records, ratios relative to the first row."""
    head = f"{'method':<28}{'params/layer':>13}{'Table 1':>11}{'params MB':>11}{'paper':>8}{'ratio':>7}" \
           f"{'KV/token':>10}{'KV MB':>9}{'paper':>8}"
    lines = [head, "-" * len(head)]
    base = records[0]["params"]
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for r in records:
        lines.append(f"{r['label']:<28}{r['params']:>13,}{r['table1_params']:>11,}{r['params_mb']:>11.2f}"
                     f"{fmt(r['paper_params_mb']):>8}{r['params'] / base:>7.3f}{r['kv_floats']:>10}"
                     f"{r['kv_mb']:>9.2f}{fmt(r['paper_kv_mb']):>8}")
    return "\n".join(lines)
