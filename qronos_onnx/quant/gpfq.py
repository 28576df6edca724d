"""GPFQ (Lybrand and Saab, JMLR 22(156), 2021): greedy path-following quantization.

One pass, no update of future weights: each ``q_t`` is chosen so that the first ``t`` quantized
columns on the quantized stream best reproduce the first ``t`` float columns on the float stream:

    q_t = Quant( (sum_{j<=t} w_j G_jt  -  sum_{j<t} q_j H_jt) / H_tt )

See docs/algorithm.md; the tests compare with ``tests/reference.py`` (``gpfq``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import LayerProblem, SolveSettings


def gpfq(problem: LayerProblem, solver_block: int) -> Tensor:
    """GPFQ on a prepared layer (``problem.G`` required).

    The float-stream terms of all columns come from one product ``W triu(G)``; the quantized
    terms are added block by block, as in GPTQ's lazy batches.

    Returns:
        codes ``[C, d]`` in solve order (floats).
    """
    if problem.G is None:
        raise ValueError("gpfq needs G = X X~^T / n")
    assert problem.H is not None
    dtype = problem.weight.dtype
    H = problem.H.to(dtype)
    target = problem.weight @ torch.triu(problem.G.to(dtype))
    C, d = problem.weight.shape
    codes = torch.empty_like(problem.weight)
    q = torch.zeros(d, C, dtype=dtype, device=H.device)  # column-major dequantized values
    for i1 in range(0, d, solver_block):
        i2 = min(i1 + solver_block, d)
        acc = (target[:, i1:i2] - (H[:i1, i1:i2].T @ q[:i1]).T).T.contiguous()
        for i in range(i2 - i1):
            t = i1 + i
            code, q[t] = problem.cols.round(acc[i] / H[t, t], t)
            codes[:, t] = code
            acc[i + 1 :].addr_(H[t, t + 1 : i2], q[t], alpha=-1)
    return codes


def solve_gpfq(
    problem: LayerProblem, lam: float, settings: SolveSettings
) -> tuple[Tensor, float, int]:
    """The ``gpfq`` solver of ``registry.SOLVERS`` (it takes no damping: ``lam`` is 0)."""
    return gpfq(problem, settings.solver_block), 0.0, 0
