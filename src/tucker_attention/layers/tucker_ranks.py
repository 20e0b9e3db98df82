"""Mode spectra and rank truncation of a :class:`~.tucker.TuckerAttention`, from its factors alone.

A reduced QR of every factor, U_k = Q_k R_k, moves its non-orthonormal part into the core::

    C' = C x1 R1 x2 R2 x3 R3   (r1, r2, r3),     W = C' x1 Q1 x2 Q2 x3 Q3   (Q_k orthonormal)

so unfold_k(W) and unfold_k(C') have the same singular values, and the truncated HOSVD of W is
that of C' mapped back: with P_k the leading left singular vectors of unfold_k(C'), every
truncated mode gets the factor Q_k P_k and the core C x_k (P_k^T R_k), i.e. W_hat = W x1 Pi1 x2 Pi2
x3 Pi3 with the orthogonal projections Pi_k = Q_k P_k P_k^T Q_k^T. All P_k come from the
unfoldings of the whole C' (classic, not sequential, HOSVD), so each kept mode holds the energy
its spectrum says and ||W - W_hat||^2 = ||W||^2 - ||W_hat||^2. Nothing larger than a factor
(d, r) or the core is formed; an unfolding's singular vectors and values come from its
(r_k, r_k) Gram matrix.

RoPE pairs: latent RoPE rotates pairs of the r3 latent coordinates defined by U3's columns, each
with its frequency (PAPER.md §5), so mode 3 of W (and of W_tilde when it shares U3) has no free
basis: at its current rank it keeps U3 and the core's mode-3 coordinates exactly, and a lower
(even) r3 keeps the highest-energy directions that mix only pairs of one frequency, each with
that frequency (:func:`.rope_pairs.pair_truncation`; with distinct frequencies: whole pairs).
Their energies (:func:`pair_spectrum`) are averaged over all position offsets. A shared latent
serves both tensors, so both modes 3 are truncated by one basis: without RoPE the leading left
singular vectors of the joint unfolding [unfold_3(C'), unfold_3(C~')] (r3, r1 r2 + r1~ r2~), whose
singular values both modes report; under RoPE the pairs of the joint energies.
"""

from __future__ import annotations

import torch

from .._checks import check_ranks
from .rope_pairs import pair_energies, pair_truncation

SIDES = ("ranks", "value_ranks")      # W (pre-softmax) and W_tilde (post-softmax)


def _unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-(mode+1) unfolding (I_mode, prod of the others), mode 0-based."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _times(core: torch.Tensor, mode: int, matrix: torch.Tensor) -> torch.Tensor:
    """core x_(mode+1) matrix, matrix (p, I_mode), mode 0-based. When most fibers of ``core`` along
    ``mode`` are zero (an exact GQA / MHA form's core routes each head to one key group: 1 - 1/n_kv of
    them), only the others are multiplied; the zero ones stay exactly zero."""
    nonzero = core.ne(0).any(dim=mode)                                 # (the other modes)
    if 2 * int(nonzero.sum()) > nonzero.numel():
        return torch.tensordot(matrix, core, dims=([1], [mode])).movedim(0, mode)
    fibers = core.movedim(mode, -1)
    out = core.new_zeros(*fibers.shape[:-1], matrix.shape[0])
    out[nonzero] = fibers[nonzero] @ matrix.T
    return out.movedim(-1, mode)


def _left_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P (r, r), s (r,)): all left singular vectors and the singular values (descending) of matrix
    (r, m), from the eigendecomposition of its Gram (r, r), whose eigenvalues s^2 are the energies
    (several times faster than an SVD of the wide matrix; s below ~1e-8 of the largest is not resolved)."""
    energies, P = torch.linalg.eigh(matrix @ matrix.T)
    return P.flip(-1), energies.flip(0).clamp(min=0).sqrt()


def fixed_modes(layer) -> tuple[tuple[bool, bool, bool], tuple[bool, bool, bool]]:
    """Which modes of (W, W_tilde) must keep their basis: mode 3 of W under latent RoPE or latent q/k
    norms, and of W_tilde too when it shares U3."""
    fixed = layer.rope is not None or layer.q_norm is not None
    return (False, False, fixed), (False, False, fixed and layer.shared_kv)


def _joint(layer) -> bool:
    """Whether both modes 3 are truncated by one joint basis (a shared latent without RoPE)."""
    return layer.shared_kv and layer.rope is None


def _decompose(layer, wanted=((True,) * 3,) * 2):
    """Per side: the float64 CPU parameters, their QR pieces, plus the (P, s) of every free mode
    ``wanted`` (per side, per mode; the others' entry is "kept": their basis Q is kept as it is),
    from C' (formed only when some mode needs it: it is a copy of the core)."""
    p = {name: t.detach().to("cpu", torch.float64) for name, t in layer.named_parameters()}
    sides = []
    for core, factors in ((p["core"], (p["U1"], p["U2"], p["U3"])),
                          (p["core_tilde"], (p["U1_tilde"], p["U2_tilde"], p.get("U3_tilde", p["U3"])))):
        qr = [torch.linalg.qr(U) for U in factors]                     # reduced: Q (n, r), R (r, r)
        sides.append({"core": core, "factors": factors, "Q": [q for q, _ in qr], "R": [r for _, r in qr]})
    joint = _joint(layer) and (wanted[0][2] or wanted[1][2])
    for side, fixed, want in zip(sides, fixed_modes(layer), wanted):
        if joint or any(w and not f for w, f in zip(want, fixed)):
            side["reduced"] = _reduced(side)
        side["svd"] = [None if fixed[m] else _left_svd(_unfold(side["reduced"], m)) if want[m] else "kept"
                       for m in range(3)]
    if joint:
        joint = _left_svd(torch.cat([_unfold(side["reduced"], 2) for side in sides], dim=1))
        sides[0]["svd"][2] = sides[1]["svd"][2] = joint
    for side in sides:
        side.pop("reduced", None)
    return p, sides


def _reduced(side: dict) -> torch.Tensor:
    """C' = C x1 R1 x2 R2 x3 R3."""
    reduced = side["core"]
    for mode, R in enumerate(side["R"]):
        reduced = _times(reduced, mode, R)
    return reduced


def _pair_inputs(layer, p: dict, sides: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U3, query-side rows (r3, s), frequencies) of the RoPE key latent: the mode-3 unfolding of
    C x1 R1 x2 R2 (of both cores when the latent is shared); each side keeps its C x1 R1 x2 R2 as
    ``side['query']`` for :func:`truncated`, which needs the same product."""
    rows = []
    for side in sides[:2 if layer.shared_kv else 1]:
        side["query"] = _times(_times(side["core"], 0, side["R"][0]), 1, side["R"][1])
        rows.append(_unfold(side["query"], 2))
    return p["U3"], torch.cat(rows, dim=1), layer.rotary.inv_freq


def pair_spectrum(layer) -> torch.Tensor:
    """See :meth:`TuckerAttention.pair_spectrum`."""
    if layer.rope is None:
        raise ValueError("pair_spectrum() is for a layer with latent RoPE (rope='latent'); use mode_spectra()")
    p, sides = _decompose(layer, ((False,) * 3,) * 2)                  # the QR pieces only
    return pair_energies(*_pair_inputs(layer, p, sides))


def mode_spectra(layer) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """See :meth:`TuckerAttention.mode_spectra`."""
    _, sides = _decompose(layer)
    return {name: tuple(None if svd is None else svd[1] for svd in side["svd"])
            for name, side in zip(SIDES, sides)}


def _check_truncation(layer, ranks, value_ranks) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out = []
    for name, given, current, fixed in zip(SIDES, (ranks, value_ranks), (layer.ranks, layer.value_ranks),
                                           fixed_modes(layer)):
        new = check_ranks(name, given, (None, None, None))          # ints >= 1; the bounds below
        for mode, (r, now, keep) in enumerate(zip(new, current, fixed)):
            label = f"{name}[{mode}] (r{mode + 1}{'~' if name == 'value_ranks' else ''})"
            if keep and layer.q_norm is not None and r != now:
                raise ValueError(f"{label} must stay {now}: the q/k norms (qk_norm) act on the whole latent; got {r}")
            if keep and r % 2:
                raise ValueError(f"{label} must be even: latent RoPE rotates pairs of this latent, so it is "
                                 f"truncated by whole pairs; got {r}")
            if r > now:
                raise ValueError(f"{label} must be in [1, {now}] (truncated() keeps or lowers the current "
                                 f"{name}={current}), got {r}")
        out.append(new)
    if layer.shared_kv and out[1][2] != out[0][2]:
        raise ValueError(f"shared_kv=True ties the value latent to the key latent, so value_ranks[2] must equal "
                         f"ranks[2]={out[0][2]}, got {out[1][2]}")
    return out[0], out[1]


def truncated(layer, ranks, value_ranks):
    """See :meth:`TuckerAttention.truncated`."""
    ranks, value_ranks = _check_truncation(layer, ranks, value_ranks)
    wanted = tuple(tuple(r < now for r, now in zip(new, current))
                   for new, current in ((ranks, layer.ranks), (value_ranks, layer.value_ranks)))
    p, sides = _decompose(layer, wanted)
    freqs, pairs = layer.rope_freqs, None
    if layer.rope is not None and ranks[2] < layer.ranks[2]:          # fewer RoPE pairs, each keeps its frequency
        pairs = pair_truncation(*_pair_inputs(layer, p, sides), ranks[2] // 2)
        freqs = pairs[3].tolist()
    values, key_maps = {}, []
    names = (("core", "U1", "U2", "U3"), ("core_tilde", "U1_tilde", "U2_tilde", "U3_tilde"))
    for side, new_ranks, side_names in zip(sides, (ranks, value_ranks), names):
        core, factors, key_map = side["core"], list(side["factors"]), None
        start = 0
        if "query" in side and side["svd"][:2] == ["kept", "kept"]:    # modes 1, 2 kept: C x1 R1 x2 R2 is known
            core, factors[:2], start = side.pop("query"), side["Q"][:2], 2
        for mode, svd in list(enumerate(side["svd"]))[start:]:
            if svd is None and pairs is not None:                      # the RoPE latent, by pairs
                core, factors[mode], key_map = _times(core, mode, pairs[1]), pairs[0], pairs[1]
                continue
            if svd is None:                                            # fixed: basis and coordinates as they are
                continue
            if isinstance(svd, str):                                   # kept: its orthonormal basis Q, no cut
                core, factors[mode] = _times(core, mode, side["R"][mode]), side["Q"][mode]
                key_map = side["R"][mode] if mode == 2 else key_map
                continue
            P = svd[0][:, :new_ranks[mode]]
            step = P.T @ side["R"][mode]                               # (new r_k, r_k): old -> new coordinates
            core, factors[mode] = _times(core, mode, step), side["Q"][mode] @ P
            key_map = step if mode == 2 else key_map
        values.update(zip(side_names, (core, *factors)))
        key_maps.append(key_map)
    if layer.shared_kv:
        del values["U3_tilde"]                                         # U3 serves both (same P3 when joint)
    if layer.q_bias is not None:                                       # q_i . k = q_i^T R3^T P3 . (x Q3 P3)
        values["q_bias"] = p["q_bias"] if key_maps[0] is None else p["q_bias"] @ key_maps[0].T
        values["out_bias"] = p["out_bias"]
    if layer.k_bias is not None:                                       # a latent key vector: the key-side map
        values["k_bias"] = p["k_bias"] if pairs is None else pairs[2] @ p["k_bias"]
    if layer.q_norm is not None:                                       # the latent keeps its coordinates
        values["q_norm.weight"], values["k_norm.weight"] = p["q_norm.weight"], p["k_norm.weight"]
    with torch.device("meta"):                                         # no init work, no draw from the RNG
        new = type(layer)(layer.d_model, layer.n_heads, ranks, value_ranks=value_ranks, shared_kv=layer.shared_kv,
                          causal=layer.causal, rope=layer.rope, dropout=layer.dropout, bias=layer.q_bias is not None,
                          scale=layer.scale, rope_base=layer.rope_base, rope_freqs=freqs,
                          qk_norm=layer.q_norm is not None, norm_eps=layer.norm_eps)
    new = new.to_empty(device="cpu")
    return new.assign_parameters(values, like=layer).train(layer.training)
