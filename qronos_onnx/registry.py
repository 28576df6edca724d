"""The extension points, registered in one place: solvers, rotation kinds and output formats.

Each is known here by name with what the options and the orchestrator need to know of it,
without importing torch or ONNX (the command line's ``--help`` stays instant). The part that
does the work (a solver function, a rotation generator, a ``Format`` object) lives in its
own module and is imported on first use.

Adding one is an addition in one place: a module, and one entry below (or a call to
``register_solver`` / ``register_rotation`` / ``register_format`` from outside the package).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .schema import Range

if TYPE_CHECKING:
    from .formats.base import Format

DampingReference = Literal["mean_diag", "lambda_max"]


def _load(entry: str) -> Any:
    """The object named ``"package.module:attribute"``."""
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)


# -- solvers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solver:
    """What the package knows of a solver (``quant.solve`` runs it).

    Attributes:
        name: its option value (``--algo NAME``).
        summary: one line for the help.
        needs_h: reads ``H = X~ X~^T / n``; a solver that does not is round-to-nearest-like
            and takes no calibration data.
        needs_g: reads ``G = X X~^T / n`` (the float stream).
        damping: default relative damping, ``None`` when it takes none.
        damping_reference: what the damping is relative to (``mean_diag``: mean of
            ``diag(H)``; ``lambda_max``: the largest eigenvalue of ``H``).
        entry: the function ``f(problem, lam, settings) -> (codes, lam used, retries)`` on a
            prepared ``quant.problem.LayerProblem``, or its ``"module:function"`` (imported on
            first use); ``None`` for round-to-nearest, which ``quant.solve`` does itself.
    """

    name: str
    summary: str
    needs_h: bool
    needs_g: bool
    damping: float | None = None
    damping_reference: DampingReference | None = None
    entry: str | Callable[..., Any] | None = None

    @property
    def takes_data(self) -> bool:
        """Whether it reads calibration data."""
        return self.needs_h

    def function(self) -> Callable[..., Any]:
        if self.entry is None:
            raise ValueError(f"solver {self.name} has no function")
        return _load(self.entry) if isinstance(self.entry, str) else self.entry


#: The relative damping a solver accepts. Far below the bound the solve is already
#: round-to-nearest in effect (the ridge dominates ``H``); beyond it the float32 sweep overflows.
DAMPING = Range(0, 1e6)

SOLVERS: dict[str, Solver] = {
    s.name: s
    for s in (
        Solver("rtn", "round-to-nearest", needs_h=False, needs_g=False),
        Solver(
            "gptq",
            "GPTQ/OPTQ: min ||(W - Q) X~||",
            needs_h=True,
            needs_g=False,
            damping=0.01,
            damping_reference="mean_diag",
            entry="qronos_onnx.quant.gptq:solve_gptq",
        ),
        Solver(
            "gpfq",
            "GPFQ: greedy path following on ||W X - Q X~||",
            needs_h=True,
            needs_g=True,
            entry="qronos_onnx.quant.gpfq:solve_gpfq",
        ),
        Solver(
            "qronos",
            "Qronos: min ||W X - Q X~|| (corrects earlier layers' error)",
            needs_h=True,
            needs_g=True,
            damping=1e-3,
            damping_reference="lambda_max",
            entry="qronos_onnx.quant.qronos:solve_qronos",
        ),
    )
}


def register_solver(solver: Solver) -> None:
    """Add (or replace) a solver."""
    SOLVERS[solver.name] = solver


# -- rotations ----------------------------------------------------------------------------

#: Where rotations go (``passes/rotate.py``): the residual stream (fused), per attention head
#: between the value and output projections (fused), online before every MLP down projection.
ROTATION_SITES = ("R1", "R2", "R4")

#: Rotation kinds: ``name -> "module:function"``, a generator ``f(n, seed) -> Rotation``
#: (``quant.hadamard.Rotation``; ``seed=None``: no random signs, the online rotation R4).
ROTATIONS: dict[str, str | Callable[..., Any]] = {
    "hadamard": "qronos_onnx.quant.hadamard:random_hadamard",
}


def register_rotation(name: str, generator: Callable[..., Any]) -> None:
    """Add (or replace) a rotation kind: ``generator(n, seed) -> Rotation``."""
    ROTATIONS[name] = generator


def rotation_generator(name: str) -> Callable[..., Any]:
    entry = ROTATIONS[name]
    return _load(entry) if isinstance(entry, str) else entry


# -- output formats -----------------------------------------------------------------------

#: Output formats: ``name -> "module:attribute"`` of its ``formats.base.Format`` (loaded on
#: first use), or the object itself.
FORMATS: dict[str, str | Format] = {
    "matmulnbits": "qronos_onnx.formats.matmulnbits:FORMAT",
    "qdq": "qronos_onnx.formats.qdq:FORMAT",
}


def register_format(fmt: Format) -> None:
    """Add (or replace) an output format (a ``formats.base.Format``)."""
    FORMATS[fmt.name] = fmt


def get_format(name: str) -> Format:
    """The ``Format`` registered as ``name``."""
    entry = FORMATS[name]
    return _load(entry) if isinstance(entry, str) else entry
