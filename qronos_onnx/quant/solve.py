"""``solve``: one entry point for every solver. Weight and statistics in, codes out."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from qronos_onnx.registry import DAMPING, SOLVERS

from .grid import Grid, quantize
from .linalg import FactorizationError, SolverWarning, largest_eigenvalue
from .magr import magr as reduce_magnitudes
from .problem import LayerProblem, SecondMoments, SolveSettings, Variant
from .weight import QuantizedWeight, SolveInfo

#: ``on_grid(weight [C, d], scales, zero_points)``: see ``solve``.
GridHook = Callable[[Tensor, Tensor, Tensor | None], None]


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
    moments: SecondMoments | None = None,
    on_grid: GridHook | None = None,
) -> QuantizedWeight:
    """Quantize one layer's weight onto ``grid``.

    Args:
        algorithm: a solver of ``registry.SOLVERS``: ``"rtn"``, ``"gptq"``, ``"gpfq"`` or
            ``"qronos"`` (the table says what each needs and its default damping: Qronos
            ``1e-3 * lambda_max(H)``, chosen on held-out data, benchmarks/RESULTS.md; GPTQ
            ``0.01 * mean(diag H)``).
        weight: ``[out_features, in_features]`` float (``W``; an ONNX MatMul stores ``W^T``).
        H: ``[in, in]``, ``X~ X~^T / n`` (quantized stream). Needed by all but rtn.
        G: ``[in, in]``, ``X X~^T / n`` (row: float stream). Needed by gpfq and qronos.
        grid: the grid; its scales and zero points are fitted to ``weight`` and then frozen.
        act_order: visit columns by decreasing ``diag(H)`` (groups keep their original members).
        damping: relative damping in ``registry.DAMPING``, ``None`` for the solver's default;
            solvers that take none ignore it.
        solver_block: lazy batch width of the column loop.
        variant: qronos only: ``"step"`` (the paper's first step) or ``"ls"`` (least-squares
            projection of all columns first).
        magr: MagR's alpha (``quant.magr``): shrink the weight's largest magnitudes per row (or
            per group of the grid) keeping its output on ``H``, before the grid is fitted and
            the solver runs; needs ``H``. ``None``: off.
        name: used in warnings and logs.
        moments: ``H`` and ``G`` in a holder instead of ``H`` and ``G``; when it is ``owned``,
            the solver frees them as it goes (see ``SecondMoments``).
        on_grid: called as ``on_grid(weight, scales, zero_points)`` once the grid is fitted,
            before the solver (and before an owned ``moments`` is freed).
    Returns:
        The codes, frozen grid parameters and a ``SolveInfo``. Runs on ``weight``'s device; the
        working copy is float32 (float64 for a float64 weight) and factorisations are float64.
        A factorisation that fails at every damping falls back to RTN with a warning.
    """
    if algorithm not in SOLVERS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(SOLVERS)}")
    solver = SOLVERS[algorithm]
    if moments is None:
        moments = SecondMoments(H, G)
    H, G = moments.H, moments.G
    _check_inputs(solver.name, solver.needs_h, solver.needs_g, weight, H, G)
    if magr is not None:
        if H is None:
            raise ValueError("MagR needs H ([in, in])")
        weight = reduce_magnitudes(weight, H, magr, grid.group_size)
    scales, zero_points = grid.fit(weight)
    if on_grid is not None:
        on_grid(weight, scales, zero_points)
    if not solver.needs_h:
        return QuantizedWeight(
            rtn_codes(weight, grid, scales, zero_points),
            scales,
            zero_points,
            grid,
            SolveInfo(algorithm),
        )
    assert H is not None  # _check_inputs: a solver that needs H has it
    lam = 0.0
    if solver.damping is not None:
        rel = solver.damping if damping is None else float(damping)
        if rel not in DAMPING:
            raise ValueError(f"damping must be {DAMPING.describe()}, got {rel}")
        H64 = H.to(device=weight.device, dtype=torch.float64)
        ref = (
            float(torch.diagonal(H64).abs().mean())
            if solver.damping_reference == "mean_diag"
            else largest_eigenvalue(H64)
        )
        del H64
        lam = rel * ref
    H = G = None  # the problem takes them from ``moments``
    problem = LayerProblem.build(weight, moments, grid, scales, zero_points, act_order, name)
    n_dead = int(problem.dead.sum())
    settings = SolveSettings(solver_block, variant, name)
    try:
        codes, lam, retries = solver.function()(problem, lam, settings)
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


def _check_inputs(
    name: str, needs_h: bool, needs_g: bool, weight: Tensor, H: Tensor | None, G: Tensor | None
) -> None:
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor [out, in], got {tuple(weight.shape)} {weight.dtype}"
        )
    if not _all_finite(weight):
        raise ValueError("weight has NaN or Inf entries")
    d = weight.shape[1]
    for label, stat, needed in (("H", H, needs_h), ("G", G, needs_g)):
        if stat is None:
            if needed:
                raise ValueError(f"{name} needs {label} ([in, in] = [{d}, {d}])")
            continue
        if tuple(stat.shape) != (d, d):
            raise ValueError(f"{label} must be [in, in] = [{d}, {d}], got {tuple(stat.shape)}")
        if not _all_finite(stat):
            raise ValueError(f"{label} has NaN or Inf entries")


def _all_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t`` (one reduction: any NaN or Inf entry makes the sum non-finite)."""
    return math.isfinite(float(t.sum(dtype=torch.float64)))
