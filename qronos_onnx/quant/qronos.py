"""Qronos (Zhang, Zhang, Colbert, Saab; arXiv 2505.11695): the mismatched problem
``min_Q ||W X - Q X~||``, where ``X`` is the layer's input in the float network and ``X~`` its
input in the partially quantized network.

Each step corrects the error made so far by the choice of ``q_t`` and diffuses it into the weights
not yet quantized by (ridge) least squares. From the second step on this is exactly a GPTQ step on
``H``, so Qronos is one special first step that uses ``G``, then GPTQ's loop. The ridge ``lam``
pulls the re-fitted weights toward the original weights, not toward zero.

The derivation, the U-block property and the ``Y`` fold are in docs/algorithm.md; the
step-by-step float64 reference the tests compare with is ``tests/reference.py`` (``qronos``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gptq import gptq_sweep
from .linalg import inverse_factor, times_upper_t
from .problem import LayerProblem, SolveSettings, Variant

__all__ = ["Variant", "qronos", "solve_qronos"]


def qronos(
    problem: LayerProblem,
    lam: float,
    solver_block: int,
    variant: Variant = "step",
    name: str = "layer",
) -> tuple[Tensor, float, int]:
    """Qronos on a prepared layer (``problem.G`` required) with ridge ``lam``.

    ``variant="step"`` (the paper): with ``w`` the original row, ``Hd = H + lam I``,
        p_1 = (w . G[:, 1] - w_{>1} . H[>1, 1]) / H_11,   q_1 = Quant(p_1)
        w_{>1} <- (w . (G + lam I)[:, >1] - q_1 H[1, >1]) . Hd[>1, >1]^-1
    then GPTQ over columns 2..d with the factor ``U[1:, 1:]`` of ``Hd[>1, >1]^-1``.

    ``variant="ls"`` (Remark 5.2 of arXiv 2508.04853): ``W <- W (G + lam I) Hd^-1``, then GPTQ
    over all columns.

    Returns:
        codes ``[C, d]`` in solve order (floats), the damping used, and the damping retries.
    """
    if problem.G is None:
        raise ValueError("qronos needs G = X X~^T / n")
    assert problem.H is not None
    h0 = problem.H[0].clone()  # row 1 of H in the paper's 1-based indices (step variant)
    w, G = problem.weight, problem.G
    U, lam, retries = inverse_factor(problem.take_h(), lam, name, w.dtype)
    h0 = h0.to(w.dtype)
    if variant == "ls":
        Y = _refit(w, G, U, lam, first=0, dead=problem.dead)
        codes, _ = gptq_sweep(torch.zeros_like(w), U, problem.cols, solver_block, Y=Y)
        return codes, lam, retries
    if variant != "step":
        raise ValueError(f"variant must be 'step' or 'ls', got {variant!r}")
    codes = torch.empty_like(w)
    p1 = (w @ G[:, 0] - w[:, 1:] @ h0[1:]) / h0[0]
    codes[:, 0], q1 = problem.cols.round(p1, 0)
    U1 = U[1:, 1:]
    Y = _refit(w, G, U1, lam, first=1, dead=problem.dead)
    Y.addr_(q1, h0[1:] @ U1.T, alpha=-1)
    codes[:, 1:], _ = gptq_sweep(
        torch.zeros_like(Y), U1, problem.cols.columns(1), solver_block, Y=Y
    )
    return codes, lam, retries


def solve_qronos(
    problem: LayerProblem, lam: float, settings: SolveSettings
) -> tuple[Tensor, float, int]:
    """The ``qronos`` solver of ``registry.SOLVERS``."""
    return qronos(problem, lam, settings.solver_block, settings.variant, settings.name)


def _refit(w: Tensor, G: Tensor, U: Tensor, lam: float, first: int, dead: Tensor) -> Tensor:
    """``Y = (w G + lam w_ridge)[:, first:] U^T``, for a sweep over ``Y U`` (see ``gptq_sweep``).

    ``w`` ``[C, d]``, ``G`` ``[d, d]``, ``U`` ``[m, m]`` upper with ``m = d - first``, ``dead``
    ``[d]`` bool. The ridge pulls toward the original weights, except on dead columns (never
    active in the quantized stream), which it pulls to zero: their weights cannot matter.
    The product order follows the shape: ``(w G) U^T`` costs ``C d^2`` + ``C d m / 2``;
    ``w (G U^T)`` costs ``d^2 m / 2`` + ``C d m``, cheaper when ``C > d``.
    """
    C, d = w.shape
    if d < C:
        M = times_upper_t(G[:, first:], U)
        M[first:].add_(U.T, alpha=lam)
        Y = w @ M
    else:
        R = (w @ G)[:, first:]  # the contiguous product, then the view
        R.add_(w[:, first:], alpha=lam)
        Y = times_upper_t(R, U)
    idle = torch.nonzero(dead[first:]).flatten()
    if idle.numel():
        Y.sub_(w[:, first + idle] @ U[:, idle].T, alpha=lam)
    return Y
