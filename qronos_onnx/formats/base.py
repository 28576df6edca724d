"""What an output format is (``Format``), for the registry (``registry.FORMATS``) and the
orchestrator: the grids it can hold, the pass that writes every solved layer's codes into the
graph, and the files it writes beside the output, all declared by the format itself.

This module stays light (no torch, no ONNX at import): the registry names formats without
loading them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

    from qronos_onnx.ir.act_quant import ActQuant
    from qronos_onnx.options import Options
    from qronos_onnx.quant import Grid


class Format(ABC):
    """An output format.

    Attributes:
        name: its option value (``--format NAME``).
        summary: one line for the help.
        suffix: the output model's file suffix.
        options: the options only this format reads (``accuracy_level``): giving one with
            another format is warned about.
    """

    name: str = ""
    summary: str = ""
    suffix: str = ".onnx"
    options: tuple[str, ...] = ()

    def check(self, grids: Sequence[Grid]) -> list[str]:
        """Refuse the grids it cannot hold (``QronosError``, before any work); return notes
        for the report (how the grids are stored)."""
        return []

    def kernel_act_quant(self, options: Options, grid: Grid, in_features: int) -> ActQuant | None:
        """What the runtime's kernel does to the input of a layer written with ``grid``
        (``None``: nothing). The quantized calibration stream computes it, so that the solver
        corrects the error it makes; ``rewrite_pass`` takes those nodes out again (the kernel
        does it)."""
        return None

    def stored_bytes(
        self, grid: Grid, out_features: int, in_features: int, scale_bytes: int
    ) -> int | None:
        """Bytes one ``[out_features, in_features]`` layer takes when written with ``grid``
        (codes, scales of ``scale_bytes`` each, zero points), exactly as ``rewrite_pass``
        writes it; ``None``: not declared (a size budget cannot use this format)."""
        return None

    @abstractmethod
    def rewrite_pass(self, options: Options) -> ir.passes.PassBase:
        """The pass that writes every solved target's codes into the graph (the solved
        targets carry their ``QuantizedWeight`` in ``node.meta``, ``passes.calibrate``)."""

    def files(self, output: Path) -> list[str]:
        """The names written beside ``output`` for the model, in the order they are put in
        place (the model itself last)."""
        return [f"{output.name}.data", output.name]

    def save(self, model: ir.Model, path: Path) -> list[Path]:
        """Write ``model`` to ``path`` (in a staging directory) with the companions
        ``files`` names; returns the paths written."""
        from qronos_onnx.ir.model_io import write_model

        return write_model(model, path)
