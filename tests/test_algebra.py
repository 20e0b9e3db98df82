"""Mode products, unfoldings, Tucker reconstruction, HOSVD/HOOI against loops and tensorly."""

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.decomposition import tucker as tl_tucker

from tucker_attention.tensors import (
    energy_rank,
    hooi,
    hosvd,
    mode_product,
    mode_spectra,
    multilinear_ranks,
    top_eigenvectors,
    tucker_to_tensor,
    unfold,
)

tl.set_backend("numpy")


def random_tucker(shape, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, dtype=torch.float64, generator=g)
    factors = [torch.randn(n, r, dtype=torch.float64, generator=g) for n, r in zip(shape, ranks)]
    return tucker_to_tensor(core, factors)


def test_mode_product_matches_explicit_sums():
    T = torch.randn(3, 4, 5, dtype=torch.float64)
    U = torch.randn(6, 4, dtype=torch.float64)
    out = mode_product(T, U, 2)
    expected = torch.zeros(3, 6, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(6):
            for k in range(5):
                expected[i, j, k] = sum(T[i, n, k] * U[j, n] for n in range(4))
    torch.testing.assert_close(out, expected)


def test_unfold_holds_mode_fibres_as_columns():
    T = torch.arange(24.0).reshape(2, 3, 4)
    M = unfold(T, 2)
    assert M.shape == (3, 8)
    columns = {tuple(M[:, j].tolist()) for j in range(8)}
    assert columns == {tuple(T[i, :, k].tolist()) for i in range(2) for k in range(4)}


def test_mode_product_error_names_shapes_and_mode():
    with pytest.raises(ValueError, match=r"matrix of shape \(6, 3\) cannot multiply mode 2 of a tensor of shape "
                                         r"\(3, 4, 5\); it needs shape \(J, 4\)"):
        mode_product(torch.randn(3, 4, 5), torch.randn(6, 3), 2)
    with pytest.raises(ValueError, match=r"mode must be an integer in \[1, 3\], got 0"):
        unfold(torch.randn(3, 4, 5), 0)


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 6)] * 3), data=st.data())
def test_hosvd_is_exact_at_the_true_multilinear_ranks(shape, data):
    ranks = tuple(data.draw(st.integers(1, n)) for n in shape)
    T = random_tucker(shape, ranks, seed=data.draw(st.integers(0, 99)))
    true = multilinear_ranks(T)
    assert all(t <= r for t, r in zip(true, ranks))
    approx = hosvd(T, true)
    torch.testing.assert_close(approx.to_tensor(), T, atol=1e-9 * T.abs().max(), rtol=0)
    for U in approx.factors:                                            # orthonormal factors
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-9, rtol=0)


@pytest.mark.parametrize("ranks", [(2, 3, 3), (3, 5, 2), (1, 1, 1), (4, 6, 6)])
def test_truncation_error_against_tensorly_and_hooi_never_worse(ranks):
    torch.manual_seed(1)
    T = random_tucker((4, 9, 8), (4, 7, 6)) + 0.3 * torch.randn(4, 9, 8, dtype=torch.float64)
    ours_hosvd = (hosvd(T, ranks).to_tensor() - T).norm() / T.norm()
    ours_hooi = (hooi(T, ranks, n_iter=30).to_tensor() - T).norm() / T.norm()
    core, factors = tl_tucker(T.numpy(), rank=list(ranks), n_iter_max=100, init="svd", tol=1e-12)
    reference = np.linalg.norm(tl.tucker_to_tensor((core, factors)) - T.numpy()) / np.linalg.norm(T.numpy())
    assert ours_hooi <= ours_hosvd + 1e-12
    assert float(ours_hooi) == pytest.approx(reference, rel=0.03)
    assert float(ours_hosvd) == pytest.approx(reference, rel=0.05)


def test_spectra_and_ranks_of_a_known_tensor():
    T = random_tucker((5, 7, 6), (2, 3, 4))
    spectra = mode_spectra(T)
    assert [len(s) for s in spectra] == [5, 7, 6]
    assert multilinear_ranks(T) == (2, 3, 4)
    assert energy_rank(torch.tensor([3.0, 4.0, 0.0]), 0.99) == 2         # 16 of 25 < 0.99
    assert energy_rank(torch.tensor([4.0, 3.0, 0.0]), 0.64) == 1         # 16 of 25 = 0.64
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got 1.5"):
        energy_rank(torch.ones(3), 1.5)


def test_large_matrices_take_the_float32_eigensolver_and_keep_the_subspace():
    torch.manual_seed(0)
    n, r = 2100, 50                                                     # above FLOAT32_EIGH_ABOVE
    X = torch.randn(n, 300, dtype=torch.float64)
    S = X @ X.T
    U = top_eigenvectors(S, r)
    exact = torch.linalg.eigh(S).eigenvectors[:, -r:]
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (U @ U.T - exact @ exact.T).abs().max() < 1e-5
    assert torch.trace(U.T @ S @ U) / torch.trace(exact.T @ S @ exact) > 1 - 1e-9


def test_rank_bounds_are_checked():
    with pytest.raises(ValueError, match=r"ranks\[1\] \(r2\) must be an integer in \[1, 4\], got 5"):
        hosvd(torch.randn(3, 4, 5, dtype=torch.float64), (1, 5, 1))
