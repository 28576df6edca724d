"""Untie the lm_head: give a lm_head that reads a Transpose of the embedding table its own
weight, so that it can be quantized without touching the embedding."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.targets import tied_lm_head, untie_lm_head


class UntieLmHeadPass(ir.passes.InPlacePass):
    """Give a tied lm_head (MatMul on a Transpose of the embedding) its own weight initializer.

    Nothing is done when the ``include`` / ``exclude`` patterns (a scheme's) leave the lm_head
    out (the copy would only add a float weight).

    Requires: a decoder LLM graph.
    Ensures: the lm_head, unless the patterns leave it out, reads no Transpose of the
    embedding.
    """

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()):
        super().__init__()
        self.include, self.exclude = tuple(include), tuple(exclude)

    def requires(self, model: ir.Model) -> None:
        detect_signature(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, untie_lm_head(model, self.include, self.exclude))

    def ensures(self, model: ir.Model) -> None:
        if tied_lm_head(model, self.include, self.exclude) is not None:
            raise ir.passes.PostconditionError("the lm_head still reads the embedding table")
