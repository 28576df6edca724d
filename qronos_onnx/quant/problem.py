"""One layer's quantization problem, set up in the order a sequential solver visits columns.

Statistics (docs/algorithm.md): ``H = X~ X~^T / n`` and ``G = X X~^T / n``, both ``[d, d]``;
``G``'s row index runs over the float stream ``X``, its column index over the quantized stream
``X~``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .grid import ColumnGrid, Grid
from .linalg import SolverWarning

#: Qronos's first step: ``step`` (the paper's) or ``ls`` (a least-squares projection of all
#: columns first).
Variant = Literal["step", "ls"]


@dataclass(frozen=True)
class SolveSettings:
    """What a solver function takes besides the problem and its damping.

    Attributes:
        solver_block: lazy batch width of the column loop.
        variant: Qronos's first step (other solvers ignore it).
        name: the layer's name, for warnings.
    """

    solver_block: int = 128
    variant: Variant = "step"
    name: str = "layer"


@dataclass
class SecondMoments:
    """One layer's statistics handed to ``solve``: ``H`` ``[d, d]`` and ``G`` ``[d, d]`` or
    ``None`` (``G`` may be the same tensor as ``H``).

    ``owned``: nothing else refers to the tensors, so the solver may change them in place and
    free each as soon as it no longer needs it (``take``); the widest solve then holds about
    three ``[d, d]`` float64 matrices (docs/memory.md). Not owned: they are left as they are.
    """

    H: Tensor | None
    G: Tensor | None = None
    owned: bool = False

    def take(self) -> tuple[Tensor | None, Tensor | None]:
        """``(H, G)``, leaving this holder empty."""
        H, G = self.H, self.G
        self.H = self.G = None
        return H, G


@dataclass
class LayerProblem:
    """A layer with its columns in the order a sequential solver visits them.

    Attributes:
        weight: ``[C, d]`` copy of the original weight in solve order, in the working dtype
            (float32, or float64 when the input weight is float64).
        H: ``[d, d]`` float64 in solve order; dead columns (``diag(H) == 0``) have ``H_jj = 1``;
            ``None`` once a solver has taken it (``take_h``).
        G: ``[d, d]`` in solve order in the working dtype (it only enters products with the
            weight), or ``None``.
        dead: ``[d]`` bool, dead columns in solve order.
        order: ``[d]`` int64, the original column index at each solve position.
        cols: the grid parameters of every entry, in solve order.
    """

    weight: Tensor
    H: Tensor | None
    G: Tensor | None
    dead: Tensor
    order: Tensor
    cols: ColumnGrid

    @classmethod
    def build(
        cls,
        weight: Tensor,
        moments: SecondMoments,
        grid: Grid,
        scales: Tensor,
        zero_points: Tensor | None,
        act_order: bool,
        name: str = "layer",
    ) -> LayerProblem:
        """Order columns (by decreasing ``diag(H)`` under act-order) and fix dead columns
        (``name`` is used in warnings). Takes ``moments`` (``moments.H`` must be set)."""
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        device = weight.device
        owned = moments.owned
        H, G = moments.take()
        assert H is not None
        H = H.to(device=device, dtype=torch.float64)
        if G is not None:  # before H's dead columns are changed (G may be H)
            G = G.to(device=device, dtype=work, copy=G is H)
        d = H.shape[0]
        dead = torch.diagonal(H) == 0
        if bool(dead.any()):
            if not owned:
                H = H.clone()
            H[dead, dead] = 1.0
            n_dead = int(dead.sum())
            warnings.warn(
                f"{name}: {n_dead} of {d} input features are never active in the calibration "
                f"data (diag(H) == 0); their weights are quantized to zero",
                SolverWarning,
                stacklevel=4,
            )
        if act_order:  # each copy replaces its source (freed when owned)
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

    def take_h(self) -> Tensor:
        """``H``, leaving the problem without it (a solver that factorises ``H`` frees it)."""
        H = self.H
        assert H is not None, "H was already taken"
        self.H = None
        return H

    def unpermute(self, codes: Tensor) -> Tensor:
        """Codes ``[C, d]`` in solve order -> original column order."""
        out = torch.empty_like(codes)
        out[:, self.order] = codes
        return out
