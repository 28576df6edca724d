"""Configuration: what to quantize and how. Frozen dataclasses; presets map to CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .ir.act_quant import ActQuant
from .ir.patterns import matches
from .ir.targets import Target
from .quant import ALGORITHMS, MAX_DAMPING, Grid, Variant


@dataclass(frozen=True)
class SolverOptions:
    """How each layer is solved (see ``qronos_onnx.quant.solve``).

    Attributes:
        algorithm: ``qronos`` (default), ``gptq``, ``gpfq`` or ``rtn``.
        act_order: visit columns by decreasing ``diag(H)``.
        damping: relative damping; ``None`` for the algorithm's default.
        solver_block: lazy batch width of the column loop.
        variant: Qronos's first step: ``step`` (the paper) or ``ls``.
    """

    algorithm: str = "qronos"
    act_order: bool = True
    damping: float | None = None
    solver_block: int = 128
    variant: Variant = "step"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.solver_block < 1:
            raise ValueError(f"solver_block must be >= 1, got {self.solver_block}")
        if self.damping is not None and not 0 <= self.damping <= MAX_DAMPING:
            raise ValueError(f"damping must be a number in [0, {MAX_DAMPING:g}], got "
                             f"{self.damping}")


#: The lm_head grid under ``lm_head="int8"``.
LM_HEAD_INT8 = Grid(bits=8, group_size=None, symmetric=True)


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe.

    Attributes:
        grid: the weight grid of every target.
        solver: how layers are solved.
        lm_head: ``skip`` (the layer computing the logits stays float) or ``int8`` (int8 per
            output channel, and int8 activations when ``act_quant`` is set; a tied lm_head
            gets its own weight first).
        include: when given, only targets matching one of these are quantized.
        exclude: targets left in float. Patterns are globs, or regexes written ``re:PATTERN``,
            matched against readable and node names.
        overrides: ``(pattern, grid)`` pairs: targets matching a pattern use its grid.
        act_quant: activation quantizer in front of every quantized layer (W4A4, W8A8).
    """

    grid: Grid = field(default_factory=lambda: Grid(bits=4, group_size=128))
    solver: SolverOptions = field(default_factory=SolverOptions)
    lm_head: Literal["skip", "int8"] = "skip"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Grid], ...] = ()
    act_quant: ActQuant | None = None

    def __post_init__(self) -> None:
        if self.lm_head not in ("skip", "int8"):
            raise ValueError(f"lm_head must be 'skip' or 'int8', got {self.lm_head!r}")

    def grid_for(self, target: Target) -> Grid:
        """The grid of one target: int8 per channel for the lm_head (policy ``int8``), else
        the first override whose pattern matches, else ``grid``; per channel where its groups
        are larger than the target's rows (``Grid.for_features``)."""
        if target.lm_head:
            return LM_HEAD_INT8
        return self.requested_grid(target).for_features(target.in_features)

    def requested_grid(self, target: Target) -> Grid:
        """The grid the recipe names for a (non-lm_head) target: the first override whose
        pattern matches, else ``grid``."""
        for pattern, grid in self.overrides:
            if matches([pattern], target.name, target.node):
                return grid
        return self.grid

    def act_quant_for(self, target: Target) -> ActQuant | None:
        """The activation quantizer in front of a target: ``act_quant``, but at least 8 bits
        for the lm_head (policy ``int8`` with activation quantization: W8A8 there)."""
        if self.act_quant is None or not target.lm_head:
            return self.act_quant
        return dataclasses.replace(self.act_quant, bits=max(8, self.act_quant.bits))
