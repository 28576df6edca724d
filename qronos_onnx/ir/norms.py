"""RMSNorm in the forms exports write it, brought to one form.

An RMSNorm computes ``y = x / sqrt(mean(x^2) + eps) * scale`` over the last axis. Exports
write it as:

- ``torch.onnx``'s decomposed form: ``Pow(x, 2)`` (or ``x * x``), ``ReduceMean``, ``Add(eps)``,
  ``Sqrt``, then ``Reciprocal`` and ``Mul`` or a ``Div``, then ``Mul`` by the scale, with
  ``Cast``s around the float32 computation of a half-precision model; Gemma's scale is
  ``1 + weight`` (an ``Add`` of constants) and its last ``Cast`` follows the scale's ``Mul``;
- ``SimplifiedLayerNormalization`` (ONNX Runtime's fused op, in the default domain) and
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (the residual ``Add`` fused in front:
  inputs ``x, skip, scale[, bias]``, outputs ``y, -, -, x + skip + bias``): ONNX Runtime
  GenAI's model builder and ONNX Runtime's fusions;
- opset 23's ``RMSNormalization``.

``fuse_decomposed_norms`` rewrites the decomposed form into ``SimplifiedLayerNormalization``
(``onnxscript`` pattern rules; the same float32 computation), so that ``find_norms`` knows
three ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from .values import constant, is_constant

#: ``(domain, op_type)`` of the fused RMSNorm ops.
SIMPLIFIED = ("", "SimplifiedLayerNormalization")
SKIP_SIMPLIFIED = ("com.microsoft", "SkipSimplifiedLayerNormalization")
RMS_NORMALIZATION = ("", "RMSNormalization")
NORM_OPS = (SIMPLIFIED, SKIP_SIMPLIFIED, RMS_NORMALIZATION)
#: Normalizations that subtract the mean: not an RMSNorm, no rotation commutes with them.
LAYER_NORM_OPS = ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization")

_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


@dataclass(frozen=True)
class Norm:
    """One RMSNorm node.

    Attributes:
        node: a ``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization`` or
            ``RMSNormalization`` node.
        inputs: what is normalized: ``(x,)``, or ``(x, skip)`` for the skip form (their sum).
        output: the normalized and scaled output.
        total: the skip form's ``x + skip (+ bias)`` output when the graph uses it, else ``None``.
        scale: the scale input.
        bias: the skip form's bias input (added to the sum), or ``None``.
    """

    node: ir.Node
    inputs: tuple[ir.Value, ...]
    output: ir.Value
    total: ir.Value | None
    scale: ir.Value
    bias: ir.Value | None

    @property
    def skip(self) -> bool:
        return (self.node.domain, self.node.op_type) == SKIP_SIMPLIFIED


def find_norms(model: ir.Model) -> list[Norm]:
    """Every fused RMSNorm node of the graph, in graph order."""
    found = []
    for node in model.graph:
        key = (node.domain or "", node.op_type)
        if key not in NORM_OPS or node.inputs[0] is None:
            continue
        skip = key == SKIP_SIMPLIFIED
        inputs = tuple(v for v in node.inputs[:2] if v is not None) if skip else (node.inputs[0],)
        scale = node.inputs[2 if skip else 1]
        if scale is None:
            continue
        bias = node.inputs[3] if skip and len(node.inputs) > 3 else None
        total = node.outputs[3] if skip and len(node.outputs) > 3 else None
        if total is not None and not total.uses() and not total.is_graph_output():
            total = None
        found.append(Norm(node, inputs, node.outputs[0], total, scale, bias))
    return found


def layer_norms(model: ir.Model) -> list[ir.Node]:
    """LayerNorm nodes (fused, or decomposed: ``x - ReduceMean(x)``)."""
    found = []
    for node in model.graph:
        if node.op_type in LAYER_NORM_OPS:
            found.append(node)
        elif node.op_type == "Sub" and node.inputs[1] is not None:
            mean = node.inputs[1].producer()
            if (
                mean is not None
                and mean.op_type == "ReduceMean"
                and mean.inputs[0] is node.inputs[0]
            ):
                found.append(node)
    return found


def scale_vector(value: ir.Value) -> np.ndarray | None:
    """The value of a norm's scale as a float64 vector, when it is a constant or computed from
    constants by ``Cast``, ``Add``, ``Sub`` or ``Mul`` (Gemma's ``1 + weight``); else
    ``None``."""
    if is_constant(value):
        return np.asarray(constant(value).numpy(), dtype=np.float64)
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("Cast", "Identity") and node.inputs[0] is not None:
        return scale_vector(node.inputs[0])
    if node.op_type in ("Add", "Sub", "Mul") and all(v is not None for v in node.inputs[:2]):
        a, b = (scale_vector(v) for v in node.inputs[:2] if v is not None)
        if a is None or b is None:
            return None
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[node.op_type](a, b)
    return None


class _DecomposedRMSNorm(pattern.RewriteRuleClassBase):
    """The decomposed RMSNorm, rewritten to ``SimplifiedLayerNormalization(x, scale)``.

    Variants (one rule each, as the pattern's last node cannot be an alternative):
    ``scale_first`` (``Mul(scale, normalized)`` or ``Mul(normalized, scale)``) and
    ``cast_last`` (Gemma's half precision: ``Cast(Mul(normalized, scale))``).
    """

    def __init__(self, name: str, scale_first: bool, cast_last: bool):
        super().__init__(name)
        self.scale_first, self.cast_last = scale_first, cast_last

    def pattern(self, op, x, scale, epsilon, compute_dtype, target_dtype, two):
        xc = pattern.OrValue([op.Cast(x, to=compute_dtype), x])
        square = pattern.OrValue([op.Pow(xc, two), op.Mul(xc, xc)])
        mean = op.ReduceMean(square, [-1], keepdims=1, noop_with_empty_axes=0)
        rms = op.Sqrt(op.Add(mean, epsilon))
        normalized = pattern.OrValue([op.Mul(xc, op.Reciprocal(rms)), op.Div(xc, rms)])
        if not self.cast_last:
            normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized])
        scaled = op.Mul(scale, normalized) if self.scale_first else op.Mul(normalized, scale)
        return op.Cast(scaled, to=target_dtype) if self.cast_last else scaled

    def check(  # type: ignore[override]
        self, context, x, scale, epsilon, compute_dtype=None, two=None, **_
    ) -> MatchResult:
        result = MatchResult()
        if not _is_scalar(epsilon) or (two is not None and not _is_scalar(two, 2.0)):
            return result.fail("epsilon or the power is not a scalar constant")
        compute = ir.DataType(compute_dtype.value) if compute_dtype is not None else x.dtype
        if compute not in _FLOATS:
            return result.fail("the norm is not computed in float32 or float64")
        self._stash = compute
        return result

    def rewrite(self, op, x, scale, epsilon, target_dtype=None, **_):
        fused = op.SimplifiedLayerNormalization(
            x,
            scale,
            axis=-1,
            epsilon=float(np.asarray(constant(epsilon).numpy()).reshape(())),
            stash_type=int(self._stash),
        )
        return op.Cast(fused, to=target_dtype.value) if self.cast_last else fused


def _is_scalar(value: ir.Value | None, expected: float | None = None) -> bool:
    if value is None or not is_constant(value) or constant(value).size != 1:
        return False
    return expected is None or float(np.asarray(constant(value).numpy()).reshape(())) == expected


_RULES = pattern.RewriteRuleSet(
    [
        _DecomposedRMSNorm.rule(f"RMSNorm{i}", scale_first=first, cast_last=last)
        for i, (first, last) in enumerate(
            [(True, False), (False, False), (True, True), (False, True)]
        )
    ]
)


def fuse_decomposed_norms(model: ir.Model) -> int:
    """Rewrite every decomposed RMSNorm into ``SimplifiedLayerNormalization``; returns how
    many were rewritten."""
    return _RULES.apply_to_model(model)
