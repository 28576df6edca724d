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
- ``granularity="block"`` (dynamic, symmetric, 8 bits): what ONNX Runtime's CPU
  ``MatMulNBits`` does to its input at ``accuracy_level`` 4 (MLAS ``CompInt8``, the same on
  AVX2, AVX-512 and VNNI): each row of ``K`` values in blocks of ``block`` (the weight's block
  size; the last one padded with zeros), ``s = max|x| / 127`` per block in float32,
  ``x -> round_half_even(x * (127 / max|x|)) * s`` (a block of zeros stays zero). Only the
  quantized calibration stream runs it: the kernel does it in the written model, so the format
  removes these nodes when it writes the layer (``KERNEL_INPUT`` on the output names the
  quantizer's first node, whose input is what the kernel reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from .targets import ACT_QUANT_SOURCE, TargetGroup
from .values import drop_unused, name_of

#: ``Value.meta`` key on a static activation scale initializer: its ``StaticScale``.
ACT_SCALE = "qronos.act_scale"
#: ``Value.meta`` key on a kernel quantizer's output (``granularity="block"``): the
#: quantizer's first node, whose first input is the value the kernel itself reads (a node, not
#: the value: a rewrite may replace that value), for the format to reconnect.
KERNEL_INPUT = "qronos.kernel_input"
#: The int8 range of ``granularity="block"`` (MLAS: ``scale = max|x| / 127``).
_INT8_LEVELS = 127
#: The block peak's floor in ``127 / max|x|``: a block of zeros times a finite factor stays
#: zero (1 / float32's tiny would overflow to inf, and 0 * inf is NaN).
_PEAK_FLOOR = np.float32(1e-36)


@dataclass(frozen=True)
class ActQuant:
    """An activation quantizer.

    Attributes:
        bits: 2..8 (8 for ``block``).
        granularity: ``token`` (dynamic per-token scale), ``tensor`` (static, calibrated) or
            ``block`` (a kernel's dynamic int8 blocks along the input features).
        symmetric: signed codes and no zero point (``token`` is always symmetric).
        clip: the scale covers ``clip`` times the range (each token's ``max|x|``, or the
            calibrated range of a static scale); ``0 < clip <= 1``, values beyond saturate.
        block: values per block (``block`` granularity only).
    """

    bits: int = 4
    granularity: Literal["token", "tensor", "block"] = "token"
    symmetric: bool = True
    clip: float = 1.0
    block: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits must be 2..8, got {self.bits}")
        if self.granularity not in ("token", "tensor", "block"):
            raise ValueError(
                f"granularity must be 'token', 'tensor' or 'block', got {self.granularity!r}"
            )
        if (self.granularity == "block") != (self.block > 0):
            raise ValueError("a block size goes with granularity='block', and only with it")
        if self.granularity == "block" and (self.bits != 8 or not self.symmetric or self.clip != 1):
            raise ValueError("granularity='block' is the kernel's int8: 8 bits, symmetric, clip 1")
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
    prefix = f"{group.input}_{'kq' if spec.granularity == 'block' else 'aq'}"

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

    def peak(x: ir.Value) -> ir.Value:
        """``max |x|`` over the last axis, kept."""
        if opset >= 18:
            return add("ReduceMax", [add("Abs", [x]), const("axes", np.array([-1], np.int64))])
        return add("ReduceMax", [add("Abs", [x])], axes=[-1], keepdims=1)

    if spec.granularity == "block":
        k = group.targets[0].in_features
        out = _kernel_blocks(source, k, spec.block, dtype, const, add, peak)
    elif spec.granularity == "tensor" and spec.bits == 8:
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
            # s = clip * max|x| / qmax, as one constant divisor
            raw = add(
                "Div", [peak(source), const("qmax", np.array(spec.qmax / spec.clip, np_type))]
            )
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
    out.meta[ACT_QUANT_SOURCE] = group.source or group.input  # the float value, through chains
    if spec.granularity == "block":
        out.meta[KERNEL_INPUT] = nodes[0]
    producer = source.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(producer, nodes)
    for target in group.targets:
        graph.node(target.node).replace_input_with(0, out)
    return out


def bypass_kernel_quantizer(graph: ir.Graph, node: ir.Node) -> bool:
    """Make ``node`` read what the kernel reads instead of a kernel quantizer's output
    (``KERNEL_INPUT``), and remove the quantizer once nothing reads it. Returns whether
    ``node`` read one."""
    value = node.inputs[0]
    if value is None or KERNEL_INPUT not in value.meta:
        return False
    node.replace_input_with(0, value.meta[KERNEL_INPUT].inputs[0])
    stack = [value.producer()]
    while stack:
        dead = stack.pop()
        if dead is None or dead.graph is not graph:
            continue
        if any(out.uses() or out.is_graph_output() for out in dead.outputs):
            continue
        inputs = [v for v in dead.inputs if v is not None]
        graph.remove(dead, safe=True)
        for v in inputs:
            if v.is_initializer():
                drop_unused(graph, name_of(v))
            else:
                stack.append(v.producer())
    return True


def _kernel_blocks(source, k, block, dtype, const, add, peak) -> ir.Value:
    """MLAS's int8 blocks (``granularity="block"``) of ``source`` ``[..., k]``: in float32,
    on rows of ``k`` padded with zeros to whole blocks, reshaped back."""
    x = source if dtype == ir.DataType.FLOAT else add("Cast", [source], to=int(ir.DataType.FLOAT))
    padded = -(-k // block) * block
    rows = add("Reshape", [x, const("rows", np.array([-1, k], np.int64))])
    if padded != k:
        rows = add("Pad", [rows, const("pads", np.array([0, 0, 0, padded - k], np.int64))])
    shape = np.array([-1, padded // block, block], np.int64)
    blocks = add("Reshape", [rows, const("blocks", shape)])
    top = peak(blocks)
    levels = np.float32(_INT8_LEVELS)
    # 127 / max|x| (a block of zeros has nothing to scale: any finite factor gives zeros)
    inverse = add("Div", [const("levels", levels), add("Max", [top, const("floor", _PEAK_FLOOR)])])
    codes = add("Round", [add("Mul", [blocks, inverse])])
    y = add("Mul", [codes, add("Div", [top, const("levels_s", levels)])])
    y = add("Reshape", [y, const("padded", np.array([-1, padded], np.int64))])
    if padded != k:
        y = add(
            "Slice",
            [
                y,
                const("start", np.array([0], np.int64)),
                const("end", np.array([k], np.int64)),
                const("axis", np.array([1], np.int64)),
            ],
        )
    y = add("Reshape", [y, add("Shape", [source])])
    return y if dtype == ir.DataType.FLOAT else add("Cast", [y], to=int(dtype))


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    for node in model.graph:
        yield from node.outputs
