"""Configuration: what to quantize and how. Frozen dataclasses; presets map to CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ir.act_quant import ActQuant
from .quant import ALGORITHMS, Grid
from .quant.qronos import Variant


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


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe.

    Attributes:
        grid: the weight grid of every target.
        solver: how layers are solved.
        include_lm_head: quantize the layer that computes the logits too.
        exclude: targets left in float: globs, or regexes written ``re:PATTERN``, matched
            against readable and node names.
        act_quant: activation quantizer in front of every quantized layer (W4A4, W8A8).
    """

    grid: Grid = field(default_factory=lambda: Grid(bits=4, group_size=128))
    solver: SolverOptions = field(default_factory=SolverOptions)
    include_lm_head: bool = False
    exclude: tuple[str, ...] = ()
    act_quant: ActQuant | None = None
