"""GPTQ / OPTQ (Frantar et al., arXiv 2210.17323): the matched problem ``min ||W X~ - Q X~||``.

Columns are rounded one at a time; after each, the error is spread over the columns not yet
rounded, with the Cholesky factor ``U`` of the damped inverse ``(H + lam I)^-1``. Updates are
applied lazily in blocks of ``solver_block`` columns (Frantar et al.'s "lazy batch" trick).
See docs/algorithm.md; the tests compare with ``tests/reference.py`` (``gptq``), which inverts
each trailing block afresh.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import ColumnGrid
from .linalg import inverse_factor
from .problem import LayerProblem, SolveSettings


def gptq_sweep(
    W: Tensor, U: Tensor, cols: ColumnGrid, solver_block: int, Y: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Round the columns of ``W`` left to right, diffusing each error into the later ones.

    Args:
        W: ``[C, m]`` working weights in solve order (overwritten).
        U: ``[m, m]`` upper factor with ``(H + lam I)^-1 = U^T U`` for these columns.
        cols: grid parameters of these ``m`` columns.
        solver_block: lazy batch width.
        Y: optional ``[C, m]``; the weights rounded are then ``W + Y U``. Qronos re-fits weights
            as ``R (H + lam I)^-1 = (R U^T) U``: passing ``Y = R U^T`` folds the product with
            ``U`` into the sweep's own lazy updates instead of paying for it up front.
    Returns:
        ``codes`` ``[C, m]`` (as floats) and ``loss`` ``[C]`` = ``sum_t e_t^2`` per row with
        ``e_t = (w_t - q_t) / U_tt``. Undamped, ``loss`` equals ``(w - q) H (w - q)^T``, the
        output error ``||(w - q) X~||^2 / n`` of each row.
    """
    C, m = W.shape
    U = U.to(W.dtype)
    inv_diag = (1.0 / torch.diagonal(U)).tolist()  # Python floats: no 0-d tensors per step
    codes = torch.empty_like(W)
    loss = torch.zeros(C, dtype=W.dtype, device=W.device)
    for i1 in range(0, m, solver_block):
        i2 = min(i1 + solver_block, m)
        Ub = U[i1:i2, i1:i2]
        # Column-major copies of the block: each column is a contiguous row here.
        block = W[:, i1:i2].T.contiguous()
        y = None
        if Y is not None:
            # w_t = W_t + sum_{s<=t} Y_s U_st - sum_{s<t} e_s U_st. The Y terms from inside
            # the block are known up front: one triangular product instead of one per column.
            y = Y[:, i1:i2].T
            block.addmm_(Ub.T, y)
        block_codes = torch.empty_like(block)
        errors = torch.empty_like(block)
        for i in range(i2 - i1):
            w = block[i]
            block_codes[i], q = cols.round(w, i1 + i)
            e = errors[i]
            torch.sub(w, q, out=e).mul_(inv_diag[i1 + i])
            block[i + 1 :].addr_(Ub[i, i + 1 :], e, alpha=-1)
        codes[:, i1:i2] = block_codes.T
        loss += (errors * errors).sum(dim=0)
        if y is not None:
            errors -= y  # what the later blocks still owe: e_s - Y_s
        W[:, i2:].addmm_(errors.T, U[i1:i2, i2:], alpha=-1)
    return codes, loss


def gptq(
    problem: LayerProblem, lam: float, solver_block: int, name: str = "layer"
) -> tuple[Tensor, float, int]:
    """GPTQ on a prepared layer with ridge ``lam``.

    Dead columns are zeroed first (their inputs are always 0, so their weights do not matter).

    Returns:
        codes ``[C, d]`` in solve order (floats), the damping used, and the damping retries.
    """
    U, lam, retries = inverse_factor(problem.take_h(), lam, name, problem.weight.dtype)
    W = problem.weight.clone()
    W[:, problem.dead] = 0
    codes, _ = gptq_sweep(W, U, problem.cols, solver_block)
    return codes, lam, retries


def solve_gptq(
    problem: LayerProblem, lam: float, settings: SolveSettings
) -> tuple[Tensor, float, int]:
    """The ``gptq`` solver of ``registry.SOLVERS``."""
    return gptq(problem, lam, settings.solver_block, settings.name)
