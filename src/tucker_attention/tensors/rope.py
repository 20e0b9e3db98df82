"""Conversions of RoPE layers that keep RoPE exact (PAPER.md §5, :mod:`tucker_attention.layers.rope_pairs`).

RoPE rotates every pair of a key head by its frequency, and a complex-linear map within the
pairs of one frequency commutes with those rotations. Every conversion here starts from the
exact latent-RoPE Tucker form (:func:`.convert.to_tucker`: the key heads' pairs stacked, each
with its frequency) and only ever mixes pairs of one frequency, so positions still enter the
logits exactly as RoPE puts them there; what is cut is energy, chosen activation-aware when the
caller whitens the layer first (:func:`.convert.input_transform`).

- :func:`rope_compress`: Tucker at given ranks, truncated mode by mode (key pairs, queries, heads;
  W_tilde likewise): exact at the exact form's ranks.
- :func:`rope_gqa`: fewer key heads (head RoPE): per group of query heads and per pair slot of the
  head, the best complex direction among the group's key heads (a partial-RoPE head's unrotated
  dims by a real PCA). Exact with the source's own key heads.
- :func:`rope_mla`: one shared latent of RoPE pairs (the key pairs with the most energy, each with
  its frequency) and unrotated value directions; exact when ``kv_rank`` holds them all.

Partial RoPE (``nope_fraction``, as DeepSeek's decoupled RoPE and MHA2MLA): the pairs of the
lowest frequencies stop rotating (:func:`derotated`), so their keys are compressed together, across
heads and frequencies, without position. It changes the model (logits at offset m - n lose the
angle (m - n) f of those pairs, small while it stays small over the context) in exchange for a
freer truncation; whether it wins is a measurement (``tucker-attn convert`` makes it).
"""

from __future__ import annotations

import copy

import torch

from .._checks import check_int
from ..layers import Attention, GroupedQueryAttention, MultiHeadLatentAttention, TuckerAttention
from ..layers.factors import HeadFactors
from ..layers.rope_pairs import pair_columns, pair_truncation
from .algebra import top_eigenvectors
from .exact import to_tucker
from .view import attention_factors, key_side_basis


def _check_within(name: str, ranks, exact: tuple[int, int, int], even: bool) -> tuple[int, int, int]:
    ranks = tuple(ranks)
    if len(ranks) != 3 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"{name} must be 3 positive integers (r1, r2, r3), got {ranks}")
    for i, (r, high) in enumerate(zip(ranks, exact)):
        if r > high:
            raise ValueError(f"{name}[{i}] (r{i + 1}) must be at most {high}, the exact latent-RoPE form's "
                             f"{exact} (larger ranks add nothing), got {r}")
    if even and ranks[2] % 2:
        raise ValueError(f"{name}[2] (r3) must be even: latent RoPE rotates pairs, got {ranks[2]}")
    return ranks


def derotated(layer: TuckerAttention, nope_fraction: float) -> TuckerAttention:
    """``layer`` (latent RoPE) with the pairs of its lowest ``nope_fraction`` of distinct nonzero
    frequencies set to frequency 0 (no longer rotated: partial RoPE). The same weights; exact only
    where those angles are 0. ``nope_fraction`` 0 returns ``layer`` itself."""
    if not (isinstance(nope_fraction, (int, float)) and not isinstance(nope_fraction, bool)
            and 0 <= nope_fraction <= 1):
        raise ValueError(f"nope_fraction must be a number in [0, 1] (the share of the lowest RoPE frequencies that "
                         f"stop rotating), got {nope_fraction!r}")
    if nope_fraction == 0:
        return layer
    if layer.rope is None:
        raise ValueError(f"nope_fraction={nope_fraction} is partial RoPE, for a layer with RoPE")
    freqs = layer.rotary.inv_freq
    distinct = sorted({float(f) for f in freqs.tolist() if f != 0})
    cut = round(nope_fraction * len(distinct))
    if cut == 0:
        return layer
    lowest = set(distinct[:cut])
    new = copy.deepcopy(layer)
    new.rotary.set_frequencies(torch.tensor([0.0 if float(f) in lowest else float(f) for f in freqs.tolist()],
                                            dtype=torch.float64))
    return new


def rope_compress(layer: Attention, ranks=None, value_ranks=None, *, nope_fraction: float = 0.0) -> TuckerAttention:
    """A RoPE layer as Tucker with latent RoPE at ``ranks`` / ``value_ranks`` (default: ``ranks``;
    None: the exact form's), truncated one mode at a time (mode 3, then 2, then 1, both tensors):
    the key latent by RoPE pairs (:meth:`TuckerAttention.truncated`), the others by HOSVD. Exact
    at the exact form's ranks, e.g. (h, min(d, h*hd), n_kv*hd) for GQA. ``nope_fraction``: partial
    RoPE first (:func:`derotated`)."""
    if layer.rope is None and not layer.exact_with_norms():
        raise ValueError("rope_compress converts a layer with RoPE (or with norms its exact form keeps); use "
                         "compress() for one without")
    tucker = derotated(to_tucker(layer), nope_fraction)
    ranks = tucker.ranks if ranks is None else _check_within("ranks", ranks, tucker.ranks, tucker.rope is not None)
    value_ranks = _check_within("value_ranks", ranks if value_ranks is None else value_ranks,
                                tucker.value_ranks, tucker.shared_kv)
    if tucker.shared_kv and value_ranks[2] != ranks[2]:
        raise ValueError(f"the exact form shares its latent, so value_ranks[2] must equal ranks[2]={ranks[2]}, "
                         f"got {value_ranks[2]}")
    for mode in (2, 1, 0):                                    # sequential: each cut sees the ones before
        r, v = list(tucker.ranks), list(tucker.value_ranks)
        r[mode], v[mode] = ranks[mode], value_ranks[mode]
        if (tuple(r), tuple(v)) != (tucker.ranks, tucker.value_ranks):
            tucker = tucker.truncated(tuple(r), tuple(v))
    return tucker


def _query_rows(tucker: TuckerAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head i, A_i = U2 G[i] (h, d, r3): the query side in the key latent's coordinates; and the
    value side's C_i = U2~ G~[i] (h, d, r3~), float64."""
    p = {name: t.detach().to("cpu", torch.float64) for name, t in tucker.named_parameters()}
    G = torch.einsum("hc,cab->hab", p["U1"], p["core"])
    G_t = torch.einsum("hc,cab->hab", p["U1_tilde"], p["core_tilde"])
    return p["U2"] @ G, p["U2_tilde"] @ G_t


def rope_gqa(layer: Attention, n_kv_heads: int) -> GroupedQueryAttention:
    """A head-RoPE layer with ``n_kv_heads`` key/value heads, RoPE kept exactly (module docstring).

    Query heads are grouped in order (``n_heads / n_kv_heads`` per group). For each group and each
    rotated pair slot j of the head, the new key head's pair j is the complex direction of the
    group's key heads' pairs j that holds the most query-weighted energy; its queries are projected
    on it (:func:`~tucker_attention.layers.rope_pairs.pair_truncation`). Unrotated dims (partial
    RoPE) and values are fitted by real PCA (values as :func:`.convert.mha_to_gqa`). Query and key
    biases follow their heads; value biases pass into the output bias.
    """
    if layer.rope != "head":
        raise ValueError(f"rope_gqa converts a layer with head RoPE, got rope={layer.rope!r}")
    h, d = layer.n_heads, layer.d_model
    check_int("n_kv_heads", n_kv_heads, high=h)
    if h % n_kv_heads:
        raise ValueError(f"n_heads={h} must be divisible by n_kv_heads={n_kv_heads}; "
                         f"allowed n_kv_heads: {[g for g in range(1, h + 1) if h % g == 0]}")
    config = layer.config()
    hd, rotated = config["head_dim"], config["rope_dim"] or config["head_dim"]
    tucker = to_tucker(layer)
    order, freqs = layer.latent_pairs()                      # latent pair p: stacked key columns order[p], ...
    A, _ = _query_rows(tucker)
    U3 = tucker.U3.detach().to("cpu", torch.float64)
    q_bias = tucker.q_bias.detach().to("cpu", torch.float64) if tucker.q_bias is not None else None
    k_bias = tucker.k_bias.detach().to("cpu", torch.float64) if tucker.k_bias is not None else None
    width, half = U3.shape[1], U3.shape[1] // 2
    head_of, slot_of = order[:half] // hd, order[:half] % hd             # each latent pair's key head and slot
    blocks = [[j] for j in range(rotated // 2)] + ([list(range(rotated, rotated + (hd - rotated) // 2))]
                                                    if hd > rotated else [])
    f = attention_factors(layer, ignore_rope=True)
    n_source, per_group = layer.cache_spec()["k"][0], h // n_kv_heads
    q_w, k_w = torch.zeros(h * hd, d, dtype=torch.float64), torch.zeros(n_kv_heads * hd, d, dtype=torch.float64)
    v_w, o_w = torch.zeros_like(k_w), torch.zeros(d, h * hd, dtype=torch.float64)
    q_b, k_b = torch.zeros(h * hd, dtype=torch.float64), torch.zeros(n_kv_heads * hd, dtype=torch.float64)
    for g in range(n_kv_heads):
        heads = list(range(g * per_group, (g + 1) * per_group))
        sources = sorted({i // (h // n_source) for i in heads})                    # their key heads in the source
        for slots in blocks:                                  # one rotated slot, or every unrotated one
            pairs = torch.tensor([p for p in range(half) if int(head_of[p]) in sources and int(slot_of[p]) in slots])
            cols = pair_columns(pairs, width)
            rows = torch.cat([A[i][:, cols].T for i in heads], dim=1)                 # (2k, |group| d)
            keep = len(slots)
            factor, step, key_step, _ = pair_truncation(U3[:, cols], rows, freqs[pairs], keep)
            targets = torch.tensor(slots + [s + (rotated // 2 if s < rotated else (hd - rotated) // 2) for s in slots])
            k_w[g * hd + targets] = factor.T
            if k_bias is not None:
                k_b[g * hd + targets] = key_step @ k_bias[cols]
            for i in heads:
                q_w[i * hd + targets] = step @ A[i][:, cols].T
                if q_bias is not None:
                    q_b[i * hd + targets] = step @ q_bias[i, cols]
        V = key_side_basis(f.post, torch.tensor(heads), hd)                         # (d, hd)
        v_w[g * hd:(g + 1) * hd] = V.T
        for i in heads:
            o_w[:, i * hd:(i + 1) * hd] = f.post.A[i] @ (f.post.B[i].T @ V)
    bias = f.out_bias is not None or q_bias is not None
    target = GroupedQueryAttention(d, h, n_kv_heads, head_dim=hd, causal=layer.causal, dropout=layer.dropout,
                                   bias=bias, scale=layer.scale, rope="head", rope_dim=config["rope_dim"],
                                   rope_base=layer.rope_base, rope_freqs=layer.rotary.inv_freq.tolist())
    values = {"q_proj.weight": q_w, "k_proj.weight": k_w, "v_proj.weight": v_w, "o_proj.weight": o_w}
    if bias:
        values.update({"q_proj.bias": q_b, "k_proj.bias": k_b, "v_proj.bias": torch.zeros(n_kv_heads * hd),
                       "o_proj.bias": f.out_bias if f.out_bias is not None else torch.zeros(d)})
    return target.assign_parameters(values, like=layer)


def rope_mla(layer: Attention, kv_rank: int | None = None, q_rank: int | None = None, *,
             nope_fraction: float = 0.0) -> MultiHeadLatentAttention:
    """A head-RoPE layer as MLA with one shared latent under latent RoPE (module docstring).

    The latent holds RoPE pairs of the keys, each with its frequency, and unrotated (frequency 0)
    value directions. ``kv_rank`` (even) is shared between them by relative energy: the key pairs'
    (:meth:`TuckerAttention.pair_spectrum` of the exact form) against the values' (the value mode's
    spectrum), a pair of floats at a time; the value directions are the leading ones of the value
    Gram outside the kept key span. Each head's absorbed query (rank <= head_dim) factors into
    W^UQ_i W^UK_i^T; values are read from the whole latent by least squares. Exact when
    ``kv_rank`` (default) holds every key pair and value direction (2 n_kv head_dim for GQA,
    allowed up to 2 d_model under latent RoPE). ``q_rank``: a query latent spanning the leading
    query-side directions. ``nope_fraction``: partial RoPE first (:func:`derotated`).
    """
    if layer.rope != "head":
        raise ValueError(f"rope_mla converts a layer with head RoPE, got rope={layer.rope!r}")
    h, d = layer.n_heads, layer.d_model
    hd = layer.config()["head_dim"]
    tucker = derotated(to_tucker(layer), nope_fraction)
    r3, vr3 = tucker.ranks[2], tucker.value_ranks[2]
    full = r3 + vr3 + vr3 % 2
    kv_rank = min(full, 2 * d) if kv_rank is None else check_int("kv_rank", kv_rank, high=2 * d)
    if kv_rank % 2:
        raise ValueError(f"kv_rank must be even: latent RoPE rotates pairs of the latent, got {kv_rank}")
    if q_rank is not None:
        check_int("q_rank", q_rank, high=d)
    _, C = _query_rows(tucker)                                                      # (h, d, vr3)
    D = tucker.value_factor.detach().to("cpu", torch.float64)
    gram = HeadFactors(C, D.expand(h, -1, -1)).gram(3)                             # value side of W_tilde, (d, d)
    key_energy = tucker.pair_spectrum()
    value_energy = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)[:vr3]         # its mode-3 energies
    value_energy = torch.nn.functional.pad(value_energy, (0, value_energy.numel() % 2)).view(-1, 2).sum(1)
    items = sorted([(float(e) / float(key_energy.sum()), 0) for e in key_energy]
                   + [(float(e) / float(value_energy.sum().clamp_min(1e-300)), 1) for e in value_energy],
                   key=lambda t: (-t[0], t[1]))[:kv_rank // 2]
    n_keys = max(1, sum(1 for _, kind in items if kind == 0))
    n_values = kv_rank // 2 - n_keys
    keys = tucker if 2 * n_keys == r3 else tucker.truncated(tucker.ranks[:2] + (2 * n_keys,), tucker.value_ranks)
    A, _ = _query_rows(keys)                                                        # (h, d, 2 n_keys)
    K = keys.U3.detach().to("cpu", torch.float64)
    values = torch.zeros(d, 0, dtype=torch.float64)
    if n_values:
        outside = torch.eye(d, dtype=torch.float64) - K @ torch.linalg.pinv(K)
        values = top_eigenvectors(outside @ gram @ outside, 2 * n_values)
    half = kv_rank // 2
    latent = torch.cat([K[:, :n_keys], values[:, :n_values], K[:, n_keys:], values[:, n_values:]], dim=1)
    key_cols = torch.cat([torch.arange(n_keys), half + torch.arange(n_keys)])
    queries = torch.zeros(h, d, kv_rank, dtype=torch.float64)
    queries[:, :, key_cols] = A
    w_uq, w_uk = _per_head_factors(queries, hd)                                    # (h, d, hd), (h, kv_rank, hd)
    q_in = d
    params = {}
    if q_rank is not None:
        P = top_eigenvectors(HeadFactors(queries, queries).gram(2), q_rank)        # (d, q_rank)
        params["q_down.weight"], w_uq, q_in = P.T, P.T @ w_uq, q_rank
    M = torch.linalg.pinv(latent) @ D                                              # D ~ latent M
    w_o, w_uv = _per_head_factors(C @ M.T, hd)                                     # (h, d, hd), (h, kv_rank, hd)
    params.update({"kv_down.weight": latent.T, "q_up.weight": w_uq.mT.reshape(h * hd, q_in),
                   "k_up.weight": w_uk.mT.reshape(h * hd, kv_rank), "v_up.weight": w_uv.mT.reshape(h * hd, kv_rank),
                   "o_proj.weight": w_o.permute(1, 0, 2).reshape(d, h * hd)})
    freqs = torch.zeros(half, dtype=torch.float64)
    freqs[:n_keys] = keys.rotary.inv_freq
    bias = tucker.q_bias is not None
    if bias:
        q_latent = torch.zeros(h, kv_rank, dtype=torch.float64)
        q_latent[:, key_cols] = keys.q_bias.detach().to("cpu", torch.float64)
        k_latent = torch.zeros(kv_rank, dtype=torch.float64)
        k_latent[key_cols] = keys.k_bias.detach().to("cpu", torch.float64)
        passed = torch.einsum("hdk,hck,c->d", w_o, w_uv, k_latent)                  # the key bias read as values
        params.update({"q_up.bias": torch.einsum("hc,hck->hk", q_latent, w_uk).reshape(h * hd),
                       "kv_down.bias": k_latent,
                       "o_proj.bias": tucker.out_bias.detach().to("cpu", torch.float64) - passed})
        if q_rank is not None:
            params["q_down.bias"] = torch.zeros(q_rank, dtype=torch.float64)
    target = MultiHeadLatentAttention(d, h, kv_rank, q_rank=q_rank, head_dim=hd, rope="latent", shared_kv=True,
                                      causal=layer.causal, dropout=layer.dropout, bias=bias, down_bias=bias,
                                      scale=layer.scale, rope_base=layer.rope_base, rope_freqs=freqs.tolist())
    return target.assign_parameters(params, like=layer)


def _per_head_factors(maps: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """maps (h, p, q) -> (L (h, p, width), R (h, q, width)) with L_i R_i^T the best rank-``width``
    approximation of maps[i] (exact when its rank is at most ``width``); R has orthonormal columns."""
    U, S, Vh = torch.linalg.svd(maps, full_matrices=False)
    k = min(width, S.shape[-1])
    left = torch.zeros(maps.shape[0], maps.shape[1], width, dtype=maps.dtype)
    right = torch.zeros(maps.shape[0], maps.shape[2], width, dtype=maps.dtype)
    left[..., :k], right[..., :k] = U[..., :k] * S[..., None, :k], Vh[..., :k, :].mT
    return left, right
