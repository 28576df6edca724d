"""Insert the recipe's activation quantizer in front of every target group (W4A4, W8A8), and
after it the output format's kernel quantizer (MatMulNBits' int8 blocks at ``accuracy_level``
4).

The quantizer nodes (``ir/act_quant.py``) serve calibration and deployment alike: the quantized
stream runs them, so the solver sees exactly the activations the written model computes (a
kernel quantizer is taken out again when the layer is written: the kernel does it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import onnx_ir as ir

from qronos_onnx.errors import RecipeWarning
from qronos_onnx.ir.act_quant import ActQuant, insert_act_quant
from qronos_onnx.ir.targets import ACT_QUANT_SOURCE
from qronos_onnx.ir.values import constant
from qronos_onnx.quant import Grid
from qronos_onnx.scheme import Scheme

#: What a format's kernel does to a layer's input: ``(grid, in_features) -> ActQuant | None``
#: (``Format.kernel_act_quant`` with the run's options).
KernelActQuant = Callable[[Grid, int], ActQuant | None]


class InsertActQuantPass(ir.passes.InPlacePass):
    """Put ``scheme.act_quant_for(target)`` in front of every target group, then ``kernel``'s
    quantizer after it.

    A group whose targets would meet different kernel quantizers (layers sharing an input
    written with different block sizes) gets none, with a warning.

    Requires: the scheme's targets read float activations.
    Ensures: with an activation quantizer in the scheme, every target group reads a
    quantizer's output (its ``meta[ACT_QUANT_SOURCE]`` names the value quantized); with
    neither, the graph is unchanged.
    """

    def __init__(self, scheme: Scheme, kernel: KernelActQuant | None = None):
        super().__init__()
        self.scheme = scheme
        self.kernel = kernel

    def _groups(self, model: ir.Model):
        return self.scheme.select(model)[0]

    def requires(self, model: ir.Model) -> None:
        if any(g.source is not None for g in self._groups(model)):
            raise ir.passes.PreconditionError("activation quantizers are already in place")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        if self.scheme.act_quant is not None:
            for group in self._groups(model):
                spec = self.scheme.act_quant_for(group.targets[0])
                assert spec is not None  # the recipe has an activation quantizer
                insert_act_quant(model, group, spec, _dtype(model, group))
            modified = True
        if self.kernel is not None:
            for group in self._groups(model):  # again: their inputs are the quantizers' now
                kernel = self.kernel
                specs = {kernel(self.scheme.grid_for(t), t.in_features) for t in group.targets}
                if len(specs) > 1:
                    warnings.warn(
                        f"the layers reading {group.source or group.input} are written with "
                        "different block sizes: the runtime kernel's int8 blocks of that input "
                        "are not seen by the solver",
                        RecipeWarning,
                        stacklevel=2,
                    )
                elif (spec := specs.pop()) is not None:
                    insert_act_quant(model, group, spec, _dtype(model, group))
                    modified = True
        return ir.passes.PassResult(model, modified=modified)

    def ensures(self, model: ir.Model) -> None:
        if self.scheme.act_quant is None:
            return
        bare = [
            g.input
            for g in self._groups(model)
            if ACT_QUANT_SOURCE not in _value(model, g.input).meta
        ]
        if bare:
            raise ir.passes.PostconditionError(f"groups without a quantizer: {bare}")


def _dtype(model: ir.Model, group) -> ir.DataType:
    """The float type of a group's layers (that of its first weight)."""
    return constant(model.graph.initializers[group.targets[0].weight]).dtype


def _value(model: ir.Model, name: str) -> ir.Value:
    return next(v for n in model.graph for v in n.outputs if v.name == name)
