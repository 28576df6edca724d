"""Insert the recipe's activation quantizer in front of every target group (W4A4, W8A8).

The quantizer nodes (``ir/act_quant.py``) serve calibration and deployment alike: the quantized
stream runs them, so the solver sees exactly the activations the written model computes.
"""

from __future__ import annotations

import onnx_ir as ir

from qronos_onnx.ir.act_quant import insert_act_quant
from qronos_onnx.ir.targets import ACT_QUANT_SOURCE
from qronos_onnx.ir.values import constant
from qronos_onnx.scheme import Scheme


class InsertActQuantPass(ir.passes.InPlacePass):
    """Put ``scheme.act_quant_for(target)`` in front of every target group.

    Requires: the scheme's targets read float activations.
    Ensures: with an activation quantizer in the scheme, every target group reads a
    quantizer's output (its ``meta[ACT_QUANT_SOURCE]`` names the value quantized); without one,
    the graph is unchanged.
    """

    def __init__(self, scheme: Scheme):
        super().__init__()
        self.scheme = scheme

    def _groups(self, model: ir.Model):
        return self.scheme.select(model)[0]

    def requires(self, model: ir.Model) -> None:
        if any(g.source is not None for g in self._groups(model)):
            raise ir.passes.PreconditionError("activation quantizers are already in place")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.scheme.act_quant is None:
            return ir.passes.PassResult(model, modified=False)
        for group in self._groups(model):
            first = group.targets[0]
            dtype = constant(model.graph.initializers[first.weight]).dtype
            spec = self.scheme.act_quant_for(first)
            assert spec is not None  # the recipe has an activation quantizer (checked above)
            insert_act_quant(model, group, spec, dtype)
        return ir.passes.PassResult(model, modified=True)

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


def _value(model: ir.Model, name: str) -> ir.Value:
    return next(v for n in model.graph for v in n.outputs if v.name == name)
