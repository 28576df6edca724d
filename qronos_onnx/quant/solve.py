"""``solve``: one entry point for every solver. Weight and statistics in, codes out."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .gpfq import gpfq
from .gptq import gptq
from .grid import Grid, quantize
from .linalg import FactorizationError, SolverWarning, largest_eigenvalue
from .magr import magr as reduce_magnitudes
from .problem import LayerProblem
from .qronos import Variant, qronos
from .weight import QuantizedWeight, SolveInfo

ALGORITHMS = ("rtn", "gptq", "gpfq", "qronos")

#: Default relative damping. GPTQ: ``lam = damping * mean(diag H)``. Qronos:
#: ``lam = damping * lambda_max(H)``. The reference implementation uses 1e-6 for weight-only
#: and 1e-3 with activation quantization; with a few tens of thousands of calibration tokens
#: 1e-6 overfits H, and 1e-3 was best on held-out data (benchmarks/RESULTS.md, "Qronos damping").
#: GPFQ and RTN take no damping.
DEFAULT_DAMPING = {"gptq": 0.01, "qronos": 1e-3}

#: The largest relative damping accepted. Far below it the solve is already round-to-nearest
#: in effect (the ridge dominates ``H``); beyond it the float32 sweep overflows.
MAX_DAMPING = 1e6


def solve(
    algorithm: str,
    weight: Tensor,
    H: Tensor | None = None,
    G: Tensor | None = None,
    *,
    grid: Grid,
    act_order: bool = True,
    damping: float | None = None,
    solver_block: int = 128,
    variant: Variant = "step",
    magr: float | None = None,
    name: str = "layer",
) -> QuantizedWeight:
    """Quantize one layer's weight onto ``grid``.

    Args:
        algorithm: ``"rtn"``, ``"gptq"``, ``"gpfq"`` or ``"qronos"``.
        weight: ``[out_features, in_features]`` float (``W``; an ONNX MatMul stores ``W^T``).
        H: ``[in, in]``, ``X~ X~^T / n`` (quantized stream). Needed by all but rtn.
        G: ``[in, in]``, ``X X~^T / n`` (row: float stream). Needed by gpfq and qronos.
        grid: the grid; its scales and zero points are fitted to ``weight`` and then frozen.
        act_order: visit columns by decreasing ``diag(H)`` (groups keep their original members).
        damping: relative damping, see ``DEFAULT_DAMPING``; gptq and qronos only.
        solver_block: lazy batch width of the column loop.
        variant: qronos only: ``"step"`` (the paper's first step) or ``"ls"`` (least-squares
            projection of all columns first).
        magr: MagR's alpha (``quant.magr``): shrink the weight's largest magnitudes per row (or
            per group of the grid) keeping its output on ``H``, before the grid is fitted and
            the solver runs; needs ``H``. ``None``: off.
        name: used in warnings and logs.
    Returns:
        The codes, frozen grid parameters and a ``SolveInfo``. Runs on ``weight``'s device; the
        working copy is float32 (float64 for a float64 weight) and factorisations are float64.
        A factorisation that fails at every damping falls back to RTN with a warning.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    _check_inputs(algorithm, weight, H, G)
    if magr is not None:
        if H is None:
            raise ValueError("MagR needs H ([in, in])")
        weight = reduce_magnitudes(weight, H, magr, grid.group_size)
    scales, zero_points = grid.fit(weight)
    if algorithm == "rtn":
        return QuantizedWeight(
            rtn_codes(weight, grid, scales, zero_points),
            scales,
            zero_points,
            grid,
            SolveInfo("rtn"),
        )

    assert H is not None  # _check_inputs: every algorithm but rtn needs H
    problem = LayerProblem.build(weight, H, G, grid, scales, zero_points, act_order, name)
    n_dead = int(problem.dead.sum())
    lam, retries = 0.0, 0
    try:
        if algorithm == "gpfq":
            codes = gpfq(problem, solver_block)
        else:
            rel = DEFAULT_DAMPING[algorithm] if damping is None else float(damping)
            if not 0 <= rel <= MAX_DAMPING:
                raise ValueError(f"damping must be a number in [0, {MAX_DAMPING:g}], got {rel}")
            H64 = H.to(device=weight.device, dtype=torch.float64)
            ref = (
                float(torch.diagonal(H64).abs().mean())
                if algorithm == "gptq"
                else largest_eigenvalue(H64)
            )
            if algorithm == "gptq":
                codes, lam, retries = gptq(problem, rel * ref, solver_block, name)
            else:
                codes, lam, retries = qronos(problem, rel * ref, solver_block, variant, name)
    except FactorizationError as err:
        msg = f"{err}; falling back to RTN"  # err starts with the layer name
        warnings.warn(msg, SolverWarning, stacklevel=2)
        info = SolveInfo(algorithm, act_order, 0.0, 0, True, n_dead)
        return QuantizedWeight(
            rtn_codes(weight, grid, scales, zero_points), scales, zero_points, grid, info
        )
    info = SolveInfo(algorithm, act_order, lam, retries, False, n_dead)
    codes = problem.unpermute(codes).to(grid.code_dtype)
    return QuantizedWeight(codes, scales, zero_points, grid, info)


def rtn_codes(weight: Tensor, grid: Grid, scales: Tensor, zero_points: Tensor | None) -> Tensor:
    """Round-to-nearest codes ``[C, d]`` of ``weight`` on the fitted grid."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale, zero = grid.entry_params(scales, zero_points, weight.shape[1], work)
    return quantize(weight.detach().to(work), scale, zero, grid.qmin, grid.qmax).to(grid.code_dtype)


def _check_inputs(algorithm: str, weight: Tensor, H: Tensor | None, G: Tensor | None) -> None:
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor [out, in], got {tuple(weight.shape)} {weight.dtype}"
        )
    if not _all_finite(weight):
        raise ValueError("weight has NaN or Inf entries")
    d = weight.shape[1]
    needed = {"rtn": (), "gptq": ("H",), "gpfq": ("H", "G"), "qronos": ("H", "G")}[algorithm]
    for label, stat in (("H", H), ("G", G)):
        if stat is None:
            if label in needed:
                raise ValueError(f"{algorithm} needs {label} ([in, in] = [{d}, {d}])")
            continue
        if tuple(stat.shape) != (d, d):
            raise ValueError(f"{label} must be [in, in] = [{d}, {d}], got {tuple(stat.shape)}")
        if not _all_finite(stat):
            raise ValueError(f"{label} has NaN or Inf entries")


def _all_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t`` (one reduction: any NaN or Inf entry makes the sum non-finite)."""
    return math.isfinite(float(t.sum(dtype=torch.float64)))
