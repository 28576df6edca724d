"""The linear algebra the solvers share: damped inverse factors, triangular products and the
largest eigenvalue of ``H`` (docs/algorithm.md: the U-block property, damping).

All ``[d, d]`` matrices are symmetric positive semi-definite Gram matrices (``H``) or upper
triangular factors (``U``); factorisations run in float64.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

MAX_DAMPING_RETRIES = 6


class SolverWarning(UserWarning):
    """A solver met degenerate statistics and worked around them (see the message)."""


class FactorizationError(RuntimeError):
    """No damping made ``H + lam I`` factorisable."""


def largest_eigenvalue(H: Tensor, iterations: int = 30, seed: int = 0) -> float:
    """``lambda_max`` of a symmetric PSD ``[d, d]`` matrix by seeded power iteration.

    Deterministic for a given input (fixed start vector). Returns 0 for a zero matrix.
    """
    scale = float(H.abs().max())
    if scale == 0:
        return 0.0
    A = H.to(torch.float32, copy=True).div_(scale)  # a damping scale needs no more precision
    v = torch.rand(H.shape[0], generator=torch.Generator().manual_seed(seed)).to(H.device)
    for _ in range(iterations):
        v = A @ v
        v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
    return float(v @ (A @ v)) * scale


def inverse_factor(
    H: Tensor, lam: float, name: str = "layer", dtype: torch.dtype = torch.float64
) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + lam I)^-1``, so that ``(H + lam I)^-1 = U^T U``.

    ``U[i:, i:]`` is then also the factor of the inverse of the trailing block
    ``(H + lam I)[i:, i:]``, which is what GPTQ's column loop uses at step ``i``.
    Factorised in float64 (a Gram matrix of millions of tokens is too ill-conditioned for
    float32); ``U`` is returned in ``dtype``. When the factorisation fails, ``lam`` is raised
    tenfold (from at least ``1e-6 * mean(diag H)``) up to ``MAX_DAMPING_RETRIES`` times, with a
    warning each time.

    Memory: a caller that passes the last reference to ``H`` has it freed here; then at most
    two ``[d, d]`` float64 matrices and ``U`` live at once (docs/memory.md).

    Returns:
        ``(U, lam_used, retries)``.
    Raises:
        FactorizationError: no damping worked; nothing has been modified.
    """
    # With J the reversal permutation and J (H + lam I) J = L L^T, the upper factor of the
    # inverse is U = J L^-1 J: one Cholesky and one triangular inverse.
    damped = H.to(torch.float64).flip(0, 1)
    del H
    diag = torch.diagonal(damped).clone()
    floor = 1e-6 * float(diag.abs().mean()) or 1e-6
    for retries in range(MAX_DAMPING_RETRIES + 1):
        torch.diagonal(damped).copy_(diag + lam)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            del damped
            U = _flipped_lower_inverse(L, dtype)
            if U is not None:
                return U, lam, retries
            # An inverse too large for float64 (rare): J H J again from the factor, its
            # diagonal exact (set at the next try), the rest to rounding.
            damped = L @ L.T
        del L
        if retries == MAX_DAMPING_RETRIES:
            break
        new_lam = max(10.0 * lam, floor)
        msg = (
            f"{name}: H + lam I is not positive definite at lam={lam:.3g}; "
            f"retrying with lam={new_lam:.3g}"
        )
        warnings.warn(msg, SolverWarning, stacklevel=3)
        lam = new_lam
    raise FactorizationError(f"{name}: no damping up to lam={lam:.3g} made H factorisable")


def _flipped_lower_inverse(L: Tensor, dtype: torch.dtype, panels: int = 8) -> Tensor | None:
    """``J L^-1 J`` in ``dtype`` for a lower-triangular float64 ``L`` ``[d, d]`` (``J`` the
    reversal), one column panel of ``L^-1`` at a time; ``None`` if it is not finite.

    Column panel ``[p, q)`` of ``L^-1`` is zero above row ``p``, so each panel is a triangular
    solve with the trailing block ``L[p:, p:]``: about half the work of ``solve(L, I)``. Each
    panel goes into the result as soon as it is solved (flipped, in ``dtype``), so no float64
    inverse is ever whole.
    """
    d = L.shape[0]
    out = torch.zeros_like(L, dtype=dtype)  # the layout of L (column-major from LAPACK)
    width = max(1, -(-d // panels))
    for p in range(0, d, width):
        q = min(p + width, d)
        rhs = torch.zeros(d - p, q - p, dtype=L.dtype, device=L.device)
        rhs.diagonal().fill_(1.0)  # columns p:q of the identity, rows p:
        block = torch.linalg.solve_triangular(L[p:, p:], rhs, upper=False)
        if not math.isfinite(float(block.sum())):
            return None
        out[: d - p, d - q : d - p] = block.flip(0, 1)
    return out


def times_upper_t(R: Tensor, U: Tensor, panels: int = 8) -> Tensor:
    """``R @ U^T`` for an upper-triangular ``U`` ``[m, m]``, skipping its zero half.

    Output columns ``[p, q)`` only see rows ``p:`` of ``U^T``, so each panel is a product with
    the trailing part: about 55% of the work of the dense product.
    """
    m = U.shape[0]
    out = R.new_empty((*R.shape[:-1], m))
    width = max(1, -(-m // panels))
    for p in range(0, m, width):
        q = min(p + width, m)
        out[..., p:q] = R[..., p:] @ U[p:q, p:].T
    return out
