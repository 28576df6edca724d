"""Integer quantization grids: what values a quantized weight may take.

Conventions (docs/algorithm.md, "The grid"):

- A weight is ``W`` of shape ``[out_features, in_features]`` (``C x d``). Rows are independent.
- A *group* is ``group_size`` consecutive input features of one row; ``group_size=None`` means
  one group per row (per output channel). When ``d`` is not a multiple of ``group_size`` the last
  group is short.
- Codes are integers. Symmetric grids use signed codes ``[-2^(b-1), 2^(b-1)-1]`` (narrow range:
  ``[-(2^(b-1)-1), 2^(b-1)-1]``, so 2-bit narrow is ternary ``{-1, 0, 1}``) and no zero point.
  Asymmetric grids use unsigned codes ``[0, 2^b-1]`` and an integer zero point per group.
- A code ``q`` stands for ``(q - zero_point) * scale``.
- A symmetric group's scale is ``m / -2^(b-1)``, with ``m`` its weight of largest magnitude
  (sign included): ``m`` sits exactly on the most negative code and all ``2^b`` codes are used
  (llama.cpp's Q4_0 and ONNX Runtime's quantizer do the same). The scale is negative when ``m``
  is positive. Narrow-range grids use ``max|w| / qmax``.

Scales and zero points are fitted once, from the original weight, and then frozen: every solver
rounds onto exactly these parameters ("static groups" when columns are reordered).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ScaleSearch = Literal["minmax", "mse"]

# MSE scale search, as in the GPTQ reference quantizer: shrink the min-max range by factors
# 1, 0.99, ..., 0.21 and keep, per group, the one with the smallest sum |Quant(w) - w|^2.4.
_MSE_STEPS = 80
_MSE_STEP = 0.01
_MSE_NORM = 2.4


@dataclass(frozen=True)
class Grid:
    """An integer grid: ``bits`` wide, symmetric or asymmetric, per channel or per group.

    Args:
        bits: 2..8.
        group_size: input features per group, or ``None`` for one group per output channel.
        symmetric: signed codes and no zero point; else unsigned codes with an integer zero point.
        narrow_range: symmetric only; drop the most negative code (``bits=2`` gives ternary).
        scale_search: ``"minmax"`` (range of the group) or ``"mse"`` (best shrink of that range).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    narrow_range: bool = False
    scale_search: ScaleSearch = "minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(
                f"group_size must be a positive integer or None, got {self.group_size!r}"
            )
        if self.narrow_range and not self.symmetric:
            raise ValueError("narrow_range applies to symmetric grids only")
        if self.scale_search not in ("minmax", "mse"):
            raise ValueError(f"scale_search must be 'minmax' or 'mse', got {self.scale_search!r}")

    @classmethod
    def ternary(cls, group_size: int | None = None, scale_search: ScaleSearch = "minmax") -> Grid:
        """The 1.58-bit grid: codes in {-1, 0, 1} times a scale."""
        return cls(
            bits=2,
            group_size=group_size,
            symmetric=True,
            narrow_range=True,
            scale_search=scale_search,
        )

    @property
    def qmin(self) -> int:
        """Smallest code."""
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        """Largest code."""
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """``int8`` for symmetric codes, ``uint8`` for asymmetric ones."""
        return torch.int8 if self.symmetric else torch.uint8

    def group_len(self, in_features: int) -> int:
        """Input features per group (``in_features`` itself when per channel, or when the
        group is larger than a row)."""
        return in_features if self.group_size is None else min(self.group_size, in_features)

    def for_features(self, in_features: int) -> Grid:
        """This grid for a layer of ``in_features`` inputs: per channel when its groups are
        larger than a row (a group cannot span rows; the two grids are the same)."""
        if self.group_size is not None and self.group_size > in_features:
            return dataclasses.replace(self, group_size=None)
        return self

    def n_groups(self, in_features: int) -> int:
        """Groups per row: ``ceil(in_features / group_size)``, 1 when per channel."""
        g = self.group_len(in_features)
        return (in_features + g - 1) // g

    def entry_params(
        self, scales: Tensor, zero_points: Tensor | None, in_features: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Per-group ``scales`` and ``zero_points`` ``[C, n_groups]`` -> per-entry ``[C, d]``.

        Zero points come back as floats (zeros for symmetric grids).
        """
        g = self.group_len(in_features)
        scale = scales.to(dtype).repeat_interleave(g, dim=1)[:, :in_features]
        if zero_points is None:
            return scale, torch.zeros_like(scale)
        return scale, zero_points.to(dtype).repeat_interleave(g, dim=1)[:, :in_features]

    def column_groups(self, in_features: int, device: torch.device | str = "cpu") -> Tensor:
        """``[in_features]`` int64: the group index of every input feature."""
        return torch.arange(in_features, device=device) // self.group_len(in_features)

    def fit(self, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """Fit the frozen grid parameters to a weight.

        Args:
            weight: ``[C, d]`` float.
        Returns:
            ``scales`` ``[C, n_groups]`` float32 (holding values representable in the weight's
            dtype when it is float16 or bfloat16) and ``zero_points``
            ``[C, n_groups]`` uint8 (``None`` for symmetric grids). Scales are non-zero;
            symmetric ones carry the sign of their group's extreme (see the module docstring).
        """
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        C, d = weight.shape
        g = self.group_len(d)
        n = self.n_groups(d)
        w = weight.detach().to(torch.float32)
        # Zero padding of a short last group changes nothing: the range always contains 0
        # and 0 is always exactly on the grid.
        w = torch.nn.functional.pad(w, (0, n * g - d)).reshape(C, n, g)
        lo = w.amin(dim=-1).clamp(max=0)
        hi = w.amax(dim=-1).clamp(min=0)
        if self.symmetric and not self.narrow_range:  # signed extreme of each group
            lo = torch.where(-lo >= hi, lo, hi)
            hi = lo
        scales, zeros = self._params(lo, hi)
        if self.scale_search == "mse":
            scales, zeros = self._mse_search(w, lo, hi, scales, zeros)
        if weight.dtype in (torch.float16, torch.bfloat16):
            # Exported scales are stored in the weight's dtype: round them now, so that the
            # solver rounds onto the grid the deployed model will use.
            scales = scales.to(weight.dtype).to(torch.float32)
        scales = _fill_empty_groups(scales)
        if zeros is not None:
            zeros = zeros.to(torch.uint8)
        return scales, zeros

    def _params(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor | None]:
        """Scales (and zero points as float) covering ``[lo, hi]``; 0 where the range is empty.

        Symmetric full-range grids get ``lo == hi ==`` the signed extreme ``m``: ``m / qmin``.
        """
        if self.symmetric and not self.narrow_range:
            return lo / self.qmin, None
        if self.symmetric:
            return torch.maximum(-lo, hi) / self.qmax, None
        scale = (hi - lo) / (self.qmax - self.qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / safe), self.qmin, self.qmax)
        return scale, zero

    def _mse_search(
        self, w: Tensor, lo: Tensor, hi: Tensor, scales: Tensor, zeros: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        best = torch.full_like(scales, float("inf"))
        for i in range(_MSE_STEPS):
            shrink = 1.0 - _MSE_STEP * i
            s, z = self._params(lo * shrink, hi * shrink)
            s_safe = torch.where(s != 0, s, torch.ones_like(s))
            z_or_0 = torch.zeros_like(s) if z is None else z
            codes = quantize(w, s_safe[..., None], z_or_0[..., None], self.qmin, self.qmax)
            err = (dequantize(codes, s_safe[..., None], z_or_0[..., None]) - w).abs_()
            err = err.pow_(_MSE_NORM).sum(dim=-1)
            better = err < best
            best = torch.where(better, err, best)
            scales = torch.where(better, s, scales)
            if zeros is not None:
                assert z is not None  # an asymmetric grid: every fit has zero points
                zeros = torch.where(better, z, zeros)
        return scales, zeros


def _fill_empty_groups(scales: Tensor) -> Tensor:
    """Give all-zero groups (scale 0) the smallest scale magnitude of the layer.

    Their codes stay exactly on zero; a small scale keeps any error the solver diffuses into
    them small instead of letting them jump to a full step of an arbitrary size.
    """
    nonzero = scales[scales != 0].abs()
    fill = nonzero.min() if nonzero.numel() else torch.tensor(1.0, device=scales.device)
    return torch.where(scales != 0, scales, fill)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest (half to even) codes of ``w``, as floats: ``clamp(round(w/s) + z)``."""
    return torch.clamp(torch.round(w / scale) + zero, qmin, qmax)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The values the codes stand for: ``(codes - zero) * scale``."""
    return (codes - zero) * scale


@dataclass
class ColumnGrid:
    """A fitted grid expanded to one scale and zero point per weight entry, column-major.

    The solvers walk over columns in some order (act-order permutes them); this holds, for every
    column *in that order* and every row, the parameters of the entry's original group. Rows of
    ``scale`` are columns of the weight, so one column's parameters are contiguous in memory.

    Attributes:
        scale: ``[m, C]`` non-zero; ``scale[j]`` belongs to solve-order column ``j``.
        zero: ``[m, C]`` zero points as floats (0 for symmetric grids).
        qmin, qmax: code range.
    """

    scale: Tensor
    zero: Tensor
    qmin: int
    qmax: int

    @classmethod
    def expand(
        cls,
        grid: Grid,
        scales: Tensor,
        zero_points: Tensor | None,
        order: Tensor,
        dtype: torch.dtype,
    ) -> ColumnGrid:
        """Per-entry parameters for columns ``order`` (``[m]`` original column indices)."""
        groups = grid.column_groups(order.numel(), device=scales.device)[order]
        scale = scales.to(dtype).T[groups].contiguous()
        zero = (
            torch.zeros_like(scale)
            if zero_points is None
            else zero_points.to(dtype).T[groups].contiguous()
        )
        return cls(scale, zero, grid.qmin, grid.qmax)

    def columns(self, start: int, stop: int | None = None) -> ColumnGrid:
        """The parameters of columns ``start:stop``."""
        return ColumnGrid(self.scale[start:stop], self.zero[start:stop], self.qmin, self.qmax)

    def round(self, values: Tensor, cols: int | slice) -> tuple[Tensor, Tensor]:
        """Codes and dequantized values of weight column(s) ``cols``.

        ``values`` is column-major like ``scale``: ``[C]`` for one column, ``[k, C]`` for a slice.
        """
        s, z = self.scale[cols], self.zero[cols]
        codes = quantize(values, s, z, self.qmin, self.qmax)
        return codes, dequantize(codes, s, z)
