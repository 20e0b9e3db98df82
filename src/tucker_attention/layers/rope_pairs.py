"""RoPE latents whose pairs carry their own frequencies, and how to shorten them exactly.

A latent of even width r holds RoPE pairs p = 0 .. r/2 - 1 in columns (p, p + r/2) (the
rotate-half layout of :mod:`.rope`), pair p with inverse frequency f_p. Read as the complex
number z_p = x_p + i y_p, pair p is multiplied by e^{i f_p t} at position t. A map that is
complex-linear within the pairs of one frequency (2x2 blocks [[a, -b], [b, a]] in real terms)
commutes with every such rotation, so the keys of different heads that share a frequency can be
mixed into fewer pairs of that frequency and rotated there: logits still depend on positions
only through m - n (PAPER.md §5). Pairs of frequency 0 are not rotated: any real map mixes them.

:func:`pair_truncation` shortens a key latent this way. Within each frequency group it
orthonormalizes the keys (a complex QR of the group's columns), takes the directions that hold
the most query-weighted energy (eigenvectors of the group's Hermitian Gram, which is the real
Gram averaged over every position offset) and keeps, across all groups, the pairs of largest
energy. The energy dropped is the offset-averaged squared logit error: on whitened inputs the
truncation is the best one that keeps RoPE exact. Frequency-0 groups use a real PCA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def frequency_groups(freqs: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    """[(frequency, pair indices)] of the pairs with equal frequencies, in order of first appearance."""
    values = [float(f) for f in freqs.tolist()]
    groups: dict[float, list[int]] = {}
    for index, value in enumerate(values):
        groups.setdefault(value, []).append(index)
    return [(value, torch.tensor(pairs)) for value, pairs in groups.items()]


def pair_columns(pairs: torch.Tensor, width: int) -> torch.Tensor:
    """The latent columns of ``pairs``: their first coordinates, then their second ones (2k,)."""
    return torch.cat([pairs, pairs + width // 2])


@dataclass
class _Group:
    """One frequency group: U[:, columns] = Q @ R, and its directions (2m, 2, n) with energies (n,)
    in the coordinates Q^T x (descending)."""
    freq: float
    columns: torch.Tensor
    Q: torch.Tensor
    R: torch.Tensor
    directions: torch.Tensor
    energies: torch.Tensor


def _complex_group(U: torch.Tensor, Y: torch.Tensor, columns: torch.Tensor):
    """Complex QR of the group's keys and the eigenvectors of its phase-averaged query Gram."""
    k = columns.numel() // 2
    keys = torch.complex(U[:, columns[:k]], U[:, columns[k:]])                   # (d, k): z = keys^T x
    Qc, Rc = torch.linalg.qr(keys)                                                # (d, m), (m, k)
    Q = torch.cat([Qc.real, Qc.imag], dim=1)                                      # (d, 2m)
    R = torch.cat([torch.cat([Rc.real, Rc.imag], 1), torch.cat([-Rc.imag, Rc.real], 1)], 0)   # (2m, 2k)
    m = Qc.shape[1]
    queries = R @ Y[columns]                                                      # (2m, s), in Q^T x coordinates
    Z = torch.complex(queries[:m], queries[m:])
    energies, V = torch.linalg.eigh(Z @ Z.mH)                                     # ascending
    energies, V = energies.flip(0).clamp(min=0), V.flip(-1)
    directions = torch.stack([torch.cat([V.real, V.imag], 0), torch.cat([-V.imag, V.real], 0)], 1)   # (2m, 2, m)
    return Q, R, directions, energies


def _real_group(U: torch.Tensor, Y: torch.Tensor, columns: torch.Tensor):
    """Real QR and PCA of unrotated pairs (frequency 0), its directions taken two at a time."""
    Q, R = torch.linalg.qr(U[:, columns])                                         # (d, m), (m, 2k)
    queries = R @ Y[columns]
    energies, V = torch.linalg.eigh(queries @ queries.T)
    energies, V = energies.flip(0).clamp(min=0), V.flip(-1)
    if V.shape[1] % 2:                                                            # an odd count: pad with a dead one
        V = torch.cat([V, torch.zeros_like(V[:, :1])], 1)
        energies = torch.cat([energies, energies.new_zeros(1)])
    directions = torch.stack([V[:, 0::2], V[:, 1::2]], 1)                       # (m, 2, m/2)
    return Q, R, directions, energies[0::2] + energies[1::2]


def _groups(U: torch.Tensor, Y: torch.Tensor, freqs: torch.Tensor) -> list[_Group]:
    width = U.shape[1]
    if width % 2 or freqs.shape != (width // 2,) or Y.shape[0] != width:
        raise ValueError(f"a RoPE latent of width {width} needs {width // 2} frequencies and {width} query rows, "
                         f"got {tuple(freqs.shape)} and {Y.shape[0]}")
    out = []
    for freq, pairs in frequency_groups(freqs):
        columns = pair_columns(pairs, width)
        pieces = (_real_group if freq == 0 else _complex_group)(U, Y, columns)
        out.append(_Group(freq, columns, *pieces))
    return out


def pair_energies(U: torch.Tensor, Y: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(r/2,) float64, descending: the energy each pair of the best RoPE-exact basis carries.

    U (d, r): the key factor (keys x U, pairs in columns (p, p + r/2)); Y (r, s): the query side in
    the same coordinates (logit = sum over samples of y . (x U)); freqs (r/2,). The energies sum to
    the query-weighted key energy averaged over all position offsets.
    """
    groups = _groups(U, Y, freqs)
    return torch.cat([g.energies for g in groups]).sort(descending=True).values


def pair_truncation(U: torch.Tensor, Y: torch.Tensor, freqs: torch.Tensor, pairs: int):
    """Keep the ``pairs`` highest-energy RoPE-exact directions of a key latent (see :func:`pair_energies`).

    Returns (factor (d, 2c), step (2c, r), key_step (2c, r), freqs (c,)), c = ``pairs``: the new key
    factor, the map of query-side coordinates (new = step @ old, for cores and query biases), the map
    of key-side latent vectors (a key bias) and each new pair's frequency. Exact when ``pairs`` is
    r/2 (every direction kept), whatever the frequencies.
    """
    groups = _groups(U, Y, freqs)
    ranked = sorted(((float(e), gi, j) for gi, g in enumerate(groups) for j, e in enumerate(g.energies.tolist())),
                    key=lambda t: (-t[0], t[1], t[2]))
    if not 1 <= pairs <= len(ranked):
        raise ValueError(f"pairs must be in [1, {len(ranked)}], got {pairs}")
    d, width = U.shape
    factor = U.new_zeros(d, 2 * pairs)
    step, key_step = U.new_zeros(2 * pairs, width), U.new_zeros(2 * pairs, width)
    new_freqs = U.new_zeros(pairs)
    inverses = {}
    for t, (_, gi, j) in enumerate(ranked[:pairs]):
        g = groups[gi]
        if gi not in inverses:
            inverses[gi] = torch.linalg.pinv(g.R).T                               # key vectors: w~ = pinv(R^T) w
        B = g.directions[:, :, j]                                                 # (2m, 2)
        rows = [t, t + pairs]
        factor[:, rows] = g.Q @ B
        step[rows[0], g.columns], step[rows[1], g.columns] = B.T @ g.R
        key_step[rows[0], g.columns], key_step[rows[1], g.columns] = B.T @ inverses[gi]
        new_freqs[t] = g.freq
    return factor, step, key_step, new_freqs
