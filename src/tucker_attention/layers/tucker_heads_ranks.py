"""Lowering the ranks of a :class:`~.tucker_heads.TuckerHeadsAttention` (:func:`truncate_heads`).

Truncation weighs each side by what the other side sees, through the norms: a query error e_i
reaches the logits as (g_q s_i e_i) . k~_g, a key error as q~_i . (g_k t_g e), with g the norm
gains and s_i, t_g the norms' 1/rms on unit-variance (whitened) inputs. So the query modes (r1, r2)
are the leading singular directions of the head tensor weighted by its key group's keys, and the key
latent (r3) is the leading eigenspace of sum_g K~_g M_g K~_g^T with M_g the Gram of the group's
normalized queries: the subspace whose loss changes the logits least (a first-order model of the
norms; exact at the current ranks). A norm divides what is kept by its own rms, smaller than the
whole's, so each head's ``head_scale`` takes the square root of the energy its query and key keep.
The value side is truncated as :class:`TuckerAttention`'s.
"""

from __future__ import annotations

import torch

from .._checks import check_ranks
from .tucker import TuckerAttention


def _norm_scales(rows: torch.Tensor, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(heads, 1, D): gain x the norm's 1/rms on unit-variance inputs for heads of (heads, r, D) rows in
    orthonormal coordinates (E|z|^2 = |rows|_F^2); ones without a norm."""
    if gain is None:
        return torch.ones(rows.shape[0], 1, rows.shape[2], dtype=rows.dtype)
    rms = (rows.square().sum((1, 2)) / rows.shape[2] + eps).rsqrt()
    return rms[:, None, None] * gain[None, None, :]


def truncate_heads(layer, ranks, value_ranks):
    """``layer`` at ``ranks`` (r1, r2, r3) / ``value_ranks``, each at most the current (module docstring)."""
    ranks = check_ranks("ranks", ranks, layer.ranks)
    value_ranks = check_ranks("value_ranks", value_ranks, layer.value_ranks)
    p = {name: t.detach().to("cpu", torch.float64) for name, t in layer.named_parameters()}
    group = layer.n_heads // layer.key_heads
    Q2, R2 = torch.linalg.qr(p["U2"])
    Q3, R3 = torch.linalg.qr(p["U3"])
    heads = torch.einsum("ab,hc,cbd->had", R2, p["U1"], p["core"])            # (H, r2, D): query rows, Q2 basis
    keys = torch.einsum("ab,gbd->gad", R3, p["key_up"])                        # (Hkv, r3, D): key rows, Q3 basis
    gains = [p.get("q_norm.weight"), p.get("k_norm.weight")]
    queries = heads * _norm_scales(heads, gains[0], layer.norm_eps)            # what the logits see of each
    normed_keys = keys * _norm_scales(keys, gains[1], layer.norm_eps)
    # queries weighted by their group's keys: sqrt of each key group's Gram in head space (D, D)
    grams = normed_keys.transpose(1, 2) @ normed_keys
    energies, vectors = torch.linalg.eigh(grams)
    roots = vectors @ (energies.clamp(min=0).sqrt()[..., None] * vectors.transpose(1, 2))
    weighted = queries @ roots.repeat_interleave(group, dim=0)                   # (H, r2, D)
    P2 = _leading(weighted.transpose(0, 1).reshape(weighted.shape[1], -1), ranks[1])
    weighted = torch.einsum("ar,had->hrd", P2, weighted)
    P1 = _leading(weighted.reshape(weighted.shape[0], -1), ranks[0])           # (H, r1)
    core = torch.einsum("hc,ar,had->crd", P1, P2, heads)
    # the key latent: weighted by the Gram of each group's normalized queries
    width = queries.shape[2]
    query_grams = (queries.transpose(1, 2) @ queries).view(layer.key_heads, group, width, width).sum(1)
    gram = torch.einsum("gad,gde,gbe->ab", normed_keys, query_grams, normed_keys)
    P3 = _eigenvectors(gram)[:, :ranks[2]]
    values = {"core": core, "U1": P1, "U2": Q2 @ P2, "U3": Q3 @ P3, "key_up": torch.einsum("ar,gad->grd", P3, keys)}
    values.update(_value_side(layer, p, value_ranks))
    if layer.q_norm is not None:                 # the norms of what is kept would enlarge it: scale back
        kept_q = torch.einsum("hc,crd->hrd", P1, core).square().sum((1, 2)) / heads.square().sum((1, 2))
        kept_k = values["key_up"].square().sum((1, 2)) / keys.square().sum((1, 2))
        shrink = (kept_q * kept_k.repeat_interleave(group)).clamp(min=1e-12).sqrt()
        values["q_norm.weight"], values["k_norm.weight"] = gains
        values["head_scale"] = p["head_scale"] * shrink
    return type(layer).holding(layer, ranks, value_ranks, values, key_heads=layer.key_heads, head_dim=layer.head_dim,
                               norm_eps=layer.norm_eps)


def _eigenvectors(gram: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of a symmetric PSD ``gram``, by descending eigenvalue."""
    return torch.linalg.eigh(gram)[1].flip(-1)


def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` (from its Gram: it is wide)."""
    return _eigenvectors(matrix @ matrix.T)[:, :rank]


def _value_side(layer, p: dict, value_ranks) -> dict:
    """The value pair at ``value_ranks``, truncated as a TuckerAttention's (its HOSVD of W~)."""
    d, h = layer.d_model, layer.n_heads
    with torch.device("meta"):
        carrier = TuckerAttention(d, h, (1, 1, 1), value_ranks=layer.value_ranks)
    carrier = carrier.to_empty(device="cpu").to(torch.float64)
    with torch.no_grad():
        for name, value in p.items():
            if name.endswith("_tilde"):
                carrier.get_parameter(name).copy_(value)
        for name in ("core", "U1", "U2", "U3"):                           # a stand-in W side, never used
            carrier.get_parameter(name).fill_(1.0)
    cut = carrier.truncated((1, 1, 1), value_ranks)
    return {name: t.detach().to(torch.float64) for name, t in cut.named_parameters() if name.endswith("_tilde")}
