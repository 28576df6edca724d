"""Activation quantizers inserted in front of the quantized layers (W4A4, W8A8).

The same nodes serve calibration and deployment: the quantized stream runs them, so the solver
sees exactly the activations the deployed model computes.

- ``granularity="token"`` (dynamic, symmetric): each token's scale is computed in the graph,
  ``s = clip * max|x| / qmax`` over the features (``clip`` 1 by default),
  ``x -> clip(round(x / s), qmin, qmax) * s``. Plain ONNX arithmetic (Abs, ReduceMax, Div,
  Round, Clip, Mul) that every ONNX Runtime provider runs. No runtime has int4 x int4 kernels
  today, so for 4 bits this is a simulation of the numerics.
- ``granularity="tensor"`` (static): one scale (and zero point) per tensor, fitted on the
  quantized stream's calibration activations (``clip`` times their range). 8 bits use
  ``QuantizeLinear``/``DequantizeLinear`` (uint8 asymmetric or int8 symmetric), the QDQ form
  ONNX Runtime runs with integer kernels; other widths the same arithmetic as above with a
  constant scale. Below opset 19, where ``QuantizeLinear`` takes only float32, half-precision
  activations are cast around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from .targets import ACT_QUANT_SOURCE, TargetGroup

#: ``Value.meta`` key on a static activation scale initializer: its ``StaticScale``.
ACT_SCALE = "qronos.act_scale"


@dataclass(frozen=True)
class ActQuant:
    """An activation quantizer.

    Attributes:
        bits: 2..8.
        granularity: ``token`` (dynamic per-token scale) or ``tensor`` (static, calibrated).
        symmetric: signed codes and no zero point (``token`` is always symmetric).
        clip: the scale covers ``clip`` times the range (each token's ``max|x|``, or the
            calibrated range of a static scale); ``0 < clip <= 1``, values beyond saturate.
    """

    bits: int = 4
    granularity: Literal["token", "tensor"] = "token"
    symmetric: bool = True
    clip: float = 1.0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits must be 2..8, got {self.bits}")
        if self.granularity not in ("token", "tensor"):
            raise ValueError(f"granularity must be 'token' or 'tensor', got {self.granularity!r}")
        if not self.symmetric and (self.granularity == "token" or self.bits != 8):
            raise ValueError("asymmetric activations need granularity='tensor' and 8 bits")
        if not 0 < self.clip <= 1:
            raise ValueError(f"clip must be in (0, 1], got {self.clip}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass(frozen=True)
class StaticScale:
    """What a static scale initializer needs to be fitted: the spec, the value it quantizes
    and the zero-point initializer (``None`` when symmetric)."""

    spec: ActQuant
    source: str
    zero_point: str | None


@dataclass
class StaticRange:
    """The range of a static scale's source over the calibration activations seen so far
    (0 always inside it), widened a window at a time."""

    low: float = 0.0
    high: float = 0.0

    def add(self, array: np.ndarray) -> None:
        if array.size:
            self.low = min(self.low, float(array.min()))
            self.high = max(self.high, float(array.max()))

    def fit(self, spec: ActQuant) -> tuple[np.float32, int]:
        """Per-tensor scale and zero point covering ``clip`` times the range."""
        lo, hi = spec.clip * self.low, spec.clip * self.high
        if spec.symmetric:
            scale, zero = max(-lo, hi) / spec.qmax, 0
        else:
            scale = (hi - lo) / (spec.qmax - spec.qmin)
            zero = (
                int(np.clip(np.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)) if scale else 0
            )
        return np.float32(scale if scale > 0 else 1.0), zero


def insert_act_quant(
    model: ir.Model, group: TargetGroup, spec: ActQuant, dtype: ir.DataType
) -> ir.Value:
    """Insert a quantizer for ``group.input`` and make the group's targets read its output.

    The output value's ``meta[ACT_QUANT_SOURCE]`` names the value quantized. Returns it.
    """
    graph = model.graph
    source = next(v for v in _all_values(model) if v.name == group.input)
    np_type = dtype.numpy()
    opset = model.opset_imports.get("", 1)
    prefix = f"{group.input}_aq"

    def const(suffix: str, array) -> ir.Value:
        name = f"{prefix}_{suffix}"
        value = ir.Value(name=name, const_value=ir.Tensor(np.asarray(array), name=name))
        graph.register_initializer(value)
        return value

    nodes: list[ir.Node] = []

    def add(op: str, inputs, **attrs) -> ir.Value:
        node = ir.node(op, inputs, attrs or None, name=f"{prefix}/{op}_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    if spec.granularity == "tensor" and spec.bits == 8:
        zp_type = np.int8 if spec.symmetric else np.uint8
        # QuantizeLinear takes float16/bfloat16 input from opset 19 on: before, go via float32.
        widen = np_type != np.float32 and opset < 19
        x = add("Cast", [source], to=int(ir.DataType.FLOAT)) if widen else source
        scale = const("scale", np.array(1.0, np.float32 if widen else np_type))
        zero = const("zero_point", np.array(0, zp_type))
        scale.meta[ACT_SCALE] = StaticScale(spec, group.input, zero.name)
        q = add("QuantizeLinear", [x, scale, zero])
        out = add("DequantizeLinear", [q, scale, zero])
        if widen:
            out = add("Cast", [out], to=int(dtype))
    else:
        if spec.granularity == "tensor":
            scale = const("scale", np.array(1.0, np_type))
            scale.meta[ACT_SCALE] = StaticScale(spec, group.input, None)
        else:
            magnitude = add("Abs", [source])
            if opset >= 18:
                peak = add(
                    "ReduceMax", [magnitude, const("axes", np.array([-1], np.int64))], keepdims=1
                )
            else:
                peak = add("ReduceMax", [magnitude], axes=[-1], keepdims=1)
            # s = clip * max|x| / qmax, as one constant divisor
            raw = add("Div", [peak, const("qmax", np.array(spec.qmax / spec.clip, np_type))])
            tiny = ml_dtypes.finfo(np_type).tiny  # numpy's finfo knows no bfloat16
            scale = add("Max", [raw, const("tiny", np.array(tiny, np_type))])
        rounded = add("Round", [add("Div", [source, scale])])
        clipped = add(
            "Clip",
            [
                rounded,
                const("qmin", np.array(spec.qmin, np_type)),
                const("qmax_c", np.array(spec.qmax, np_type)),
            ],
        )
        out = add("Mul", [clipped, scale])
    out.name = prefix
    out.meta[ACT_QUANT_SOURCE] = group.input
    producer = source.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(producer, nodes)
    for target in group.targets:
        graph.node(target.node).replace_input_with(0, out)
    return out


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    for node in model.graph:
        yield from node.outputs
