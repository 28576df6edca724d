"""MagR, weight magnitude reduction (Zhang et al., 2024): before a layer is quantized, shrink
its largest weights while keeping what the layer computes on the calibration inputs.

Per output row ``w`` of ``W`` (``[C, d]``) and group of ``group_size`` inputs (the whole row when
per channel), MagR solves

    min_v  1/2 (v - w) H^ (v - w)^T  +  alpha * ||v||_inf

with ``H^ = H / lambda_max(H)`` (``H = X~ X~^T / n``, so the first term is the change of the
layer's output on the calibration set, relative to its largest direction) by proximal gradient
descent with step 1: ``v <- prox_{alpha ||.||_inf}(v - (v - w) H^)``. The proximal operator of
the l-infinity norm is ``u - alpha * P(u / alpha)`` with ``P`` the Euclidean projection onto the
unit l1 ball (Moreau decomposition); it clips ``u``'s largest magnitudes to a common level.

A smaller range per row (or group) gives the grid a smaller scale: finer steps for every other
weight. ``alpha`` sets the trade: the reference uses 1e-3 per channel and 1e-4 per group.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Proximal steps; the reference uses 150 to 200.
DEFAULT_ITERATIONS = 150


def magr(
    weight: Tensor,
    H: Tensor,
    alpha: float,
    group_size: int | None = None,
    iterations: int = DEFAULT_ITERATIONS,
) -> Tensor:
    """The weight after MagR (same shape and dtype as ``weight``).

    Args:
        weight: ``[C, d]`` (``W``, rows are output channels).
        H: ``[d, d]`` symmetric PSD, the quantized stream's second moment.
        alpha: the l-infinity penalty, > 0 (relative to ``lambda_max(H) = 1``).
        group_size: the l-infinity norm is taken per group of this many inputs (``d`` must be
            a multiple); ``None``: per row.
        iterations: proximal gradient steps.
    """
    if not alpha > 0:
        raise ValueError(f"MagR's alpha must be > 0, got {alpha}")
    C, d = weight.shape
    if tuple(H.shape) != (d, d):
        raise ValueError(f"H must be [{d}, {d}], got {tuple(H.shape)}")
    g = d if group_size is None or group_size >= d else group_size
    if d % g:
        raise ValueError(f"MagR per group needs in_features ({d}) to be a multiple of {g}")
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    lam = float(torch.linalg.eigvalsh(H.to(torch.float64))[-1])  # exact: it defines alpha's scale
    if lam <= 0:
        return weight.clone()  # no signal: any weight computes the same (zero) output
    Hn = (H.to(device=weight.device, dtype=torch.float64) / lam).to(work)
    w = weight.detach().to(work)
    v = w.clone()
    for _ in range(iterations):
        u = v - (v - w) @ Hn
        v = linf_prox(u.reshape(C * d // g, g), alpha).reshape(C, d)
    return v.to(weight.dtype)


def linf_prox(u: Tensor, alpha: float) -> Tensor:
    """``argmin_v 1/2 ||v - u||^2 + alpha ||v||_inf`` for each row of ``u`` (``[R, n]``)."""
    return u - alpha * project_l1_ball(u / alpha)


def project_l1_ball(x: Tensor) -> Tensor:
    """The Euclidean projection of each row of ``x`` (``[R, n]``) onto the unit l1 ball
    (Duchi et al., 2008): rows inside are kept; others are soft-thresholded by the ``theta``
    that brings their l1 norm to 1."""
    a = x.abs()
    inside = a.sum(dim=1, keepdim=True) <= 1
    mu = torch.sort(a, dim=1, descending=True).values
    cumsum = torch.cumsum(mu, dim=1)
    k = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
    # rho: the number of entries left non-zero, the largest k with mu_k > (cumsum_k - 1) / k
    rho = ((mu * k > cumsum - 1) * k).amax(dim=1, keepdim=True).clamp_min(1)
    theta = (torch.gather(cumsum, 1, rho.long() - 1) - 1) / rho
    shrunk = torch.sign(x) * (a - theta).clamp_min(0)
    return torch.where(inside, x, shrunk)
