"""The result of solving one layer: integer codes on a frozen grid, and how they were found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import Grid, dequantize

_DEQUANTIZE_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class SolveInfo:
    """How a solver reached its codes.

    Attributes:
        algorithm: ``rtn``, ``gptq``, ``gpfq`` or ``qronos``.
        act_order: whether columns were visited in decreasing ``diag(H)`` order.
        damping: the absolute ridge ``lam`` added to ``diag(H)`` (0 when none was used).
        retries: how many times the damping had to be raised for a Cholesky factor to exist.
        fell_back_to_rtn: no damping made ``H`` factorisable; the codes are plain RTN.
        dead_columns: input features whose ``diag(H)`` was 0 (never active in calibration).
    """

    algorithm: str
    act_order: bool = False
    damping: float = 0.0
    retries: int = 0
    fell_back_to_rtn: bool = False
    dead_columns: int = 0


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes of a ``[out_features, in_features]`` weight and the grid they live on.

    Attributes:
        codes: ``[C, d]``, ``int8`` for symmetric grids, ``uint8`` for asymmetric ones, in the
            original column order.
        scales: ``[C, n_groups]`` float32, non-zero (negative for a symmetric group whose
            largest-magnitude weight is positive; see ``grid``).
        zero_points: ``[C, n_groups]`` uint8, or ``None`` for symmetric grids.
        grid: the grid.
        info: how the codes were found.
    """

    codes: Tensor
    scales: Tensor
    zero_points: Tensor | None
    grid: Grid
    info: SolveInfo

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        out_features, in_features = self.codes.shape
        return out_features, in_features

    def dequantize(self) -> Tensor:
        """``[C, d]`` float32: ``(codes - zero_point) * scale`` of each entry's group.

        A block of rows at a time, so that the per-entry scales and float codes it expands to
        stay small next to the result for any ``C``."""
        C, d = self.codes.shape
        out = torch.empty(C, d, dtype=torch.float32, device=self.codes.device)
        step = max(1, _DEQUANTIZE_BLOCK_BYTES // (4 * max(d, 1)))
        for a in range(0, C, step):
            part = self.rows(a, min(a + step, C))
            scale, zero = self.grid.entry_params(part.scales, part.zero_points, d, torch.float32)
            out[a : a + step] = dequantize(part.codes.to(torch.float32), scale, zero)
        return out

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output channels ``start:stop`` (rows are solved independently)."""
        zp = None if self.zero_points is None else self.zero_points[start:stop]
        return QuantizedWeight(
            self.codes[start:stop], self.scales[start:stop], zp, self.grid, self.info
        )

    @staticmethod
    def stack(parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
        """Blocks of rows of one solve, stacked (the inverse of ``rows``; the first block's
        ``info``: the blocks share the statistics, so their damping and retries)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        zps = [p.zero_points for p in parts]
        return QuantizedWeight(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            None if first.zero_points is None else torch.cat(zps),  # type: ignore[arg-type]
            first.grid,
            first.info,
        )
