"""Norms between a layer's projections, and how a linearization replaces them.

A per-group RMSNorm ``y_g = g * z_g / rms(z_g)`` (``rms(z) = sqrt(mean(z^2) + eps)``) of a
projection ``z = x W^T + b`` is not linear in x. :func:`inverse_rms` estimates the
``1/rms`` of each group on a layer's inputs, so a linearization can put ``g / rms`` into the
projection's weight and bias (:func:`fold_scales`) and drop the norm.
"""

from __future__ import annotations

import torch


def inverse_rms(weight: torch.Tensor, bias: torch.Tensor | None, groups: int, eps: float,
                input_cov: torch.Tensor | None = None) -> torch.Tensor:
    """(groups,) float64: ``1 / sqrt(E[mean(z_g^2)] + eps)`` for z = x W^T + b split into ``groups``
    equal groups of outputs.

    ``input_cov`` (d, d) is the second moment E[x^T x] of the inputs (e.g.
    :func:`tucker_attention.hf.input_statistics`); None means isotropic unit-variance inputs
    (E[x^T x] = I). E[||z_g||^2] = tr(W_g E[x^T x] W_g^T) + ||b_g||^2: the cross term
    2 b_g . W_g E[x] needs the inputs' mean, which a second moment does not give, and is left
    out (exact for zero-mean inputs). This is the inverse root of the expected mean square,
    the first-order estimate of E[1/rms]: equal to it when every input gives the same rms.
    """
    w = weight.detach().to(torch.float64)
    d = w.shape[1]
    if input_cov is None:
        energy = (w * w).sum(1)                                                    # diag(W W^T)
    else:
        if not isinstance(input_cov, torch.Tensor) or tuple(input_cov.shape) != (d, d):
            shape = tuple(input_cov.shape) if isinstance(input_cov, torch.Tensor) else type(input_cov).__name__
            raise ValueError(f"input_cov must be the (d_model, d_model) = ({d}, {d}) second moment of the "
                             f"layer's inputs, got {shape}")
        sigma = input_cov.detach().to(device=w.device, dtype=torch.float64)
        if not torch.isfinite(sigma).all():
            raise ValueError("input_cov must be finite")
        energy = ((w @ sigma) * w).sum(1)                                          # diag(W Sigma W^T)
    if bias is not None:
        energy = energy + bias.detach().to(torch.float64) ** 2
    mean_square = energy.view(groups, -1).mean(1).clamp(min=0)
    return (mean_square + eps).rsqrt()


def fold_scales(linear: torch.nn.Linear, scales: torch.Tensor) -> None:
    """Multiply output row j of ``linear`` (weight and bias) by ``scales[j]`` in place, in float64."""
    s = scales.to(device=linear.weight.device, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.to(torch.float64) * s[:, None])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias.to(torch.float64) * s)
