"""One layer's quantization problem in solve order, and the linear algebra the solvers share.

Statistics (ALGORITHM.md): ``H = X~ X~^T / n`` and ``G = X X~^T / n``, both ``[d, d]``; ``G``'s
row index runs over the float stream ``X``, its column index over the quantized stream ``X~``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import ColumnGrid, Grid

MAX_DAMPING_RETRIES = 6


class SolverWarning(UserWarning):
    """A solver met degenerate statistics and worked around them (see the message)."""


class FactorizationError(RuntimeError):
    """No damping made ``H + lam I`` factorisable."""


@dataclass
class LayerProblem:
    """A layer with its columns in the order a sequential solver visits them.

    Attributes:
        weight: ``[C, d]`` copy of the original weight in solve order, in the working dtype
            (float32, or float64 when the input weight is float64).
        H: ``[d, d]`` float64 in solve order; dead columns (``diag(H) == 0``) have ``H_jj = 1``.
        G: ``[d, d]`` in solve order in the working dtype (it only enters products with the
            weight), or ``None``.
        dead: ``[d]`` bool, dead columns in solve order.
        order: ``[d]`` int64, the original column index at each solve position.
        cols: the grid parameters of every entry, in solve order.
    """

    weight: Tensor
    H: Tensor
    G: Tensor | None
    dead: Tensor
    order: Tensor
    cols: ColumnGrid

    @classmethod
    def build(cls, weight: Tensor, H: Tensor, G: Tensor | None, grid: Grid, scales: Tensor,
              zero_points: Tensor | None, act_order: bool, name: str = "layer") -> LayerProblem:
        """Order columns (by decreasing ``diag(H)`` under act-order) and fix dead columns
        (``name`` is used in warnings)."""
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        device = weight.device
        H = H.to(device=device, dtype=torch.float64)
        d = H.shape[0]
        dead = torch.diagonal(H) == 0
        if bool(dead.any()):
            H = H.clone()
            H[dead, dead] = 1.0
            n_dead = int(dead.sum())
            warnings.warn(f"{name}: {n_dead} of {d} input features are never active in the calibration "
                          f"data (diag(H) == 0); their weights are quantized to zero",
                          SolverWarning, stacklevel=4)
        G = None if G is None else G.to(device=device, dtype=work)
        if act_order:
            order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            H = H[order[:, None], order]
            G = None if G is None else G[order[:, None], order]
        else:
            order = torch.arange(d, device=device)
        return cls(
            weight=weight.detach().to(work)[:, order].clone(),
            H=H,
            G=G,
            dead=dead[order],
            order=order,
            cols=ColumnGrid.expand(grid, scales, zero_points, order, work),
        )

    def unpermute(self, codes: Tensor) -> Tensor:
        """Codes ``[C, d]`` in solve order -> original column order."""
        out = torch.empty_like(codes)
        out[:, self.order] = codes
        return out


def largest_eigenvalue(H: Tensor, iterations: int = 30, seed: int = 0) -> float:
    """``lambda_max`` of a symmetric PSD ``[d, d]`` matrix by seeded power iteration.

    Deterministic for a given input (fixed start vector). Returns 0 for a zero matrix.
    """
    scale = float(H.abs().max())
    if scale == 0:
        return 0.0
    A = H.to(torch.float32) / scale            # a damping scale needs no more precision
    v = torch.rand(H.shape[0], generator=torch.Generator().manual_seed(seed)).to(H.device)
    for _ in range(iterations):
        v = A @ v
        v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
    return float(v @ (A @ v)) * scale


def inverse_factor(H: Tensor, lam: float, name: str = "layer") -> tuple[Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + lam I)^-1``, so that ``(H + lam I)^-1 = U^T U``.

    ``U[i:, i:]`` is then also the factor of the inverse of the trailing block
    ``(H + lam I)[i:, i:]``, which is what GPTQ's column loop uses at step ``i``.
    Factorised in float64. When the factorisation fails, ``lam`` is raised tenfold (from at
    least ``1e-6 * mean(diag H)``) up to ``MAX_DAMPING_RETRIES`` times, with a warning each time.

    Returns:
        ``(U, lam_used, retries)``.
    Raises:
        FactorizationError: no damping worked; nothing has been modified.
    """
    H = H.to(torch.float64)
    diag = torch.diagonal(H)
    floor = 1e-6 * float(diag.abs().mean()) or 1e-6
    reversed_H = H.flip(0, 1)
    for retries in range(MAX_DAMPING_RETRIES + 1):
        # With J the reversal permutation and J (H + lam I) J = L L^T, the upper factor of the
        # inverse is U = J L^-1 J: one Cholesky and one triangular inverse.
        damped = reversed_H.clone()
        damped.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            U = _lower_inverse(L).flip(0, 1)
            if math.isfinite(float(U.sum())):
                return U, lam, retries
        if retries == MAX_DAMPING_RETRIES:
            break
        new_lam = max(10.0 * lam, floor)
        msg = (f"{name}: H + lam I is not positive definite at lam={lam:.3g}; "
               f"retrying with lam={new_lam:.3g}")
        warnings.warn(msg, SolverWarning, stacklevel=3)
        lam = new_lam
    raise FactorizationError(f"{name}: no damping up to lam={lam:.3g} made H factorisable")


def _lower_inverse(L: Tensor, panels: int = 8) -> Tensor:
    """Inverse of a lower-triangular ``[d, d]`` matrix, one column panel at a time.

    Column panel ``[p, q)`` of ``L^-1`` is zero above row ``p``, so each panel is a triangular
    solve with the trailing block ``L[p:, p:]``: about half the work of ``solve(L, I)``.
    """
    d = L.shape[0]
    inv = torch.zeros_like(L)
    width = max(1, -(-d // panels))
    for p in range(0, d, width):
        q = min(p + width, d)
        rhs = torch.zeros(d - p, q - p, dtype=L.dtype, device=L.device)
        rhs.diagonal().fill_(1.0)                  # columns p:q of the identity, rows p:
        inv[p:, p:q] = torch.linalg.solve_triangular(L[p:, p:], rhs, upper=False)
    return inv


def times_upper_t(R: Tensor, U: Tensor, panels: int = 8) -> Tensor:
    """``R @ U^T`` for an upper-triangular ``U`` ``[m, m]``, skipping its zero half.

    Output columns ``[p, q)`` only see rows ``p:`` of ``U^T``, so each panel is a product with
    the trailing part: about 55% of the work of the dense product.
    """
    m = U.shape[0]
    out = R.new_empty(R.shape[:-1] + (m,))
    width = max(1, -(-m // panels))
    for p in range(0, m, width):
        q = min(p + width, m)
        out[..., p:q] = R[..., p:] @ U[p:q, p:].T
    return out
