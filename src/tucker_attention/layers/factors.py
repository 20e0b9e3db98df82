"""How a layer describes its tensor view (PAPER.md §1): per-head factor pairs of W and W_tilde.

Every layer is, per head i, a pair of bilinear forms of rank <= k:

    W[i]       = A_i B_i^T    (d x d)   logits_i = scale * x W[i] x^T          A_i query side, B_i key side
    W_tilde[i] = C_i D_i^T    (d x d)   y = sum_i softmax_i (x W_tilde[i]^T)   C_i output side, D_i value side

so W[i] = W^Q_i W^K_i^T and W_tilde[i] = (W^V_i W^O_i)^T. A layer returns these from
``layer.tensor_view()``; :mod:`tucker_attention.tensors` does the algebra on them. Biases
enter as ``key_bias`` (h, d): the query bias seen from the key side, logits_i += key_bias_i . x_n;
and ``out_bias`` (d): output bias plus every value bias passed through softmax. A key bias
cancels in softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sum_over_heads(X: torch.Tensor, Y: torch.Tensor, middle: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i X_i M_i Y_i^T for X (h, p, k), Y (h, q, k), M (h, k, k) or identity.

    Accumulated head by head: no (p, h*k) copy, so peak memory stays at one (p, q) Gram.
    """
    out = torch.zeros(X.shape[1], Y.shape[1], dtype=X.dtype, device=X.device)
    for i in range(X.shape[0]):
        out.addmm_(X[i] if middle is None else X[i] @ middle[i], Y[i].T)
    return out


@dataclass(frozen=True)
class HeadFactors:
    """T[i] = A[i] @ B[i]^T for every head i: A (h, d_row, k), B (h, d_col, k)."""
    A: torch.Tensor
    B: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.A.shape[0], self.A.shape[1], self.B.shape[1]

    def dense(self) -> torch.Tensor:
        """The (h, d_row, d_col) tensor itself."""
        return self.A @ self.B.mT

    def norm_squared(self) -> torch.Tensor:
        """||T||_F^2 = sum_i tr((A_i^T A_i)(B_i^T B_i))."""
        return (self.A.mT @ self.A * (self.B.mT @ self.B)).sum()

    def gram(self, mode: int) -> torch.Tensor:
        """unfold(T, mode) @ unfold(T, mode)^T from the factors."""
        A, B = self.A, self.B
        if mode == 1:
            h, k = A.shape[0], A.shape[2]
            a = A.permute(1, 0, 2).reshape(A.shape[1], h * k)
            b = B.permute(1, 0, 2).reshape(B.shape[1], h * k)
            return ((a.T @ a) * (b.T @ b)).view(h, k, h, k).sum((1, 3))
        if mode == 2:
            return sum_over_heads(A, A, B.mT @ B)
        if mode == 3:
            return sum_over_heads(B, B, A.mT @ A)
        raise ValueError(f"mode must be 1, 2 or 3, got {mode!r}")

    def spectra(self) -> list[torch.Tensor]:
        """Singular values of the three unfoldings (from the Gram eigenvalues), descending."""
        return [torch.linalg.eigvalsh(self.gram(m)).flip(0).clamp(min=0).sqrt() for m in (1, 2, 3)]


@dataclass(frozen=True)
class AttentionFactors:
    """A layer in tensor form: ``pre`` gives W, ``post`` gives W_tilde, plus its biases."""
    pre: HeadFactors
    post: HeadFactors
    key_bias: torch.Tensor | None
    out_bias: torch.Tensor | None


def head_blocks(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A Linear weight (heads * hd, n) -> per-head (heads, n, hd): x @ result[i] is head i's output."""
    return weight.view(heads, -1, weight.shape[-1]).mT
