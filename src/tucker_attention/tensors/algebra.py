"""Tensor algebra for order-3 tensors, in the Kolda & Bader convention (SIAM Review 2009).

Modes are numbered 1, 2, 3 as in the paper. The mode-n unfolding ``unfold(T, n)`` has the
mode-n fibres as columns: shape (I_n, prod of the other sizes); its columns are in C order
(later modes vary fastest), a permutation of Kolda & Bader's, which changes neither the
singular values nor the left singular vectors. The mode-n product
``T x_n U`` with U of shape (J, I_n) multiplies every mode-n fibre by U. A Tucker tensor
``C x1 U1 x2 U2 x3 U3`` has core C (r1, r2, r3) and factors U_n (I_n, r_n).

Everything works in the dtype it is given; decompositions are best run in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import check_int


def _check_mode(tensor: torch.Tensor, mode: int) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 1 <= mode <= tensor.dim():
        raise ValueError(f"mode must be an integer in [1, {tensor.dim()}], got {mode!r}")
    return mode


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n unfolding: (I_1, ..., I_N) -> (I_n, prod_{m != n} I_m)."""
    _check_mode(tensor, mode)
    return tensor.movedim(mode - 1, 0).reshape(tensor.shape[mode - 1], -1)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``T x_n U``: tensor (I_1, ..., I_n, ..., I_N), matrix (J, I_n) -> (I_1, ..., J, ..., I_N)."""
    _check_mode(tensor, mode)
    if matrix.dim() != 2 or matrix.shape[1] != tensor.shape[mode - 1]:
        raise ValueError(f"mode_product: matrix of shape {tuple(matrix.shape)} cannot multiply mode {mode} "
                         f"of a tensor of shape {tuple(tensor.shape)}; it needs shape (J, {tensor.shape[mode - 1]})")
    return torch.tensordot(matrix, tensor, dims=([1], [mode - 1])).movedim(0, mode - 1)


class TuckerTensor(NamedTuple):
    """A Tucker decomposition: unpacks as ``core, factors``; ``factors[n-1]`` is U_n (I_n, r_n)."""
    core: torch.Tensor
    factors: tuple[torch.Tensor, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.core.shape)

    def to_tensor(self) -> torch.Tensor:
        return tucker_to_tensor(self.core, self.factors)


def tucker_to_tensor(core: torch.Tensor, factors) -> torch.Tensor:
    """``core x1 U1 x2 U2 ... xN UN``: the full tensor of a Tucker decomposition."""
    if len(factors) != core.dim():
        raise ValueError(f"tucker_to_tensor needs one factor per core mode: core has {core.dim()} modes, "
                         f"got {len(factors)} factors")
    out = core
    for mode, factor in enumerate(factors, start=1):
        out = mode_product(out, factor, mode)
    return out


def mode_spectra(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Singular values of every unfolding, each sorted descending."""
    return [torch.linalg.svdvals(unfold(tensor, n)) for n in range(1, tensor.dim() + 1)]


def numerical_rank(singular_values: torch.Tensor, rtol: float = 1e-6) -> int:
    """Number of singular values above ``rtol`` times the largest."""
    if singular_values.numel() == 0 or singular_values.max() == 0:
        return 0
    return int((singular_values > rtol * singular_values.max()).sum())


def multilinear_ranks(tensor: torch.Tensor, rtol: float = 1e-6) -> tuple[int, ...]:
    """Numerical rank of each unfolding: (r1, r2, r3) for an order-3 tensor."""
    return tuple(numerical_rank(s, rtol) for s in mode_spectra(tensor))


def energy_rank(singular_values: torch.Tensor, energy: float = 0.99) -> int:
    """Smallest r whose leading r singular values hold ``energy`` of the squared total."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    squares = singular_values.double().square()
    total = squares.sum()
    if total == 0:
        return 0
    cumulative = squares.cumsum(0) / total
    return min(int((cumulative < energy - 1e-12).sum()) + 1, singular_values.numel())


FLOAT32_EIGH_ABOVE = 2048


def top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors (columns, descending) of a symmetric PSD matrix.

    Above ``FLOAT32_EIGH_ABOVE`` rows a float64 matrix is diagonalized in float32 (about
    twice as fast) and the vectors re-orthonormalized in float64: the leading subspace is
    accurate to ~1e-6 of the largest eigenvalue, ample for truncation.
    """
    n = gram.shape[0]
    check_int("rank", rank, high=n)
    if n > FLOAT32_EIGH_ABOVE and gram.dtype == torch.float64:
        vectors = torch.linalg.eigh(gram.float()).eigenvectors.flip(-1)[:, :rank].double()
        return torch.linalg.qr(vectors).Q
    return torch.linalg.eigh(gram).eigenvectors.flip(-1)[:, :rank]


def check_mode_ranks(shape, ranks) -> tuple[int, ...]:
    """``ranks`` as a tuple, one integer in [1, size] per mode of a tensor of ``shape``; ValueError otherwise."""
    if len(ranks) != len(shape):
        raise ValueError(f"ranks must have {len(shape)} entries, got {tuple(ranks)!r}")
    return tuple(check_int(f"ranks[{n}] (r{n + 1})", r, high=size) for n, (r, size) in enumerate(zip(ranks, shape)))


def _project_all(tensor: torch.Tensor, factors) -> torch.Tensor:
    core = tensor
    for mode, U in enumerate(factors, start=1):
        core = mode_product(core, U.T, mode)
    return core


def hosvd(tensor: torch.Tensor, ranks, order=(1, 2, 3)) -> TuckerTensor:
    """Sequentially truncated HOSVD (Vannieuwenhoven et al. 2012), modes taken in ``order``.

    Each factor holds the leading left singular vectors of the unfolding of the tensor
    already projected on the modes before it; the core is the full projection.
    """
    ranks = check_mode_ranks(tensor.shape, ranks)
    if sorted(order) != list(range(1, tensor.dim() + 1)):
        raise ValueError(f"order must be a permutation of the modes 1..{tensor.dim()}, got {order!r}")
    core, factors = tensor, [None] * tensor.dim()
    for mode in order:
        unfolded = unfold(core, mode)
        factors[mode - 1] = top_eigenvectors(unfolded @ unfolded.T, ranks[mode - 1])
        core = mode_product(core, factors[mode - 1].T, mode)
    return TuckerTensor(core, tuple(factors))


def hooi(tensor: torch.Tensor, ranks, n_iter: int = 10, init: TuckerTensor | None = None) -> TuckerTensor:
    """Higher-order orthogonal iteration (De Lathauwer et al. 2000), started from :func:`hosvd`.

    Each sweep replaces U_n by the leading left singular vectors of the tensor projected on
    every other mode. The iterate with the largest ||core|| (the smallest error, since
    ||T - T_hat||^2 = ||T||^2 - ||core||^2 for orthonormal factors) is returned, so the
    result is never worse than its start.
    """
    ranks = check_mode_ranks(tensor.shape, ranks)
    check_int("n_iter", n_iter, low=0)
    best = init or hosvd(tensor, ranks)
    factors = list(best.factors)
    for _ in range(n_iter):
        for mode in range(1, tensor.dim() + 1):
            projected = tensor
            for other, U in enumerate(factors, start=1):
                if other != mode:
                    projected = mode_product(projected, U.T, other)
            unfolded = unfold(projected, mode)
            factors[mode - 1] = top_eigenvectors(unfolded @ unfolded.T, ranks[mode - 1])
        core = _project_all(tensor, factors)
        if core.norm() > best.core.norm():
            best = TuckerTensor(core, tuple(factors))
    return best
