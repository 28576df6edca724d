"""Which QDQ weights ONNX Runtime's integer CPU kernels compute exactly, on every x86 CPU.

ONNX Runtime fuses ``DequantizeLinear(uint8 activation) @ DequantizeLinear(int8 weight)`` into
an integer MatMul (``MatMulIntegerToFloat``). Its u8 x s8 kernel on x86 CPUs with AVX2 but
without VNNI multiplies with ``vpmaddubsw``, which adds two adjacent u8 x s8 products into a
*saturating* int16: with codes up to 255 and -128, a pair reaches 65,280 and is clipped to
32,767, silently. With VNNI (``vpdpbusd``: 32-bit sums) nothing saturates, so a model that is
exact on one CPU is wrong on another. Two weight forms are exact everywhere:

- int8 codes of at most 7 bits, ``|code| <= 64``: a pair is at most 2 x 255 x 64 = 32,640;
- uint8 codes: the u8 x u8 kernels widen to int16 and sum pairs in int32.

(int8 activations are shifted into uint8 by the kernel and meet the same limit.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .values import constant, is_constant, name_of, producer_of

#: The largest ``|code|`` of an int8 weight multiplied by 8-bit activations that no x86
#: kernel saturates: ``2 * 255 * INT8_WEIGHT_LIMIT <= 32767``.
INT8_WEIGHT_LIMIT = 64
INT16_MAX = 32767
_INTEGER_CODES = (ir.DataType.UINT8, ir.DataType.INT8)


def integer_codes(value: ir.Value | None) -> ir.DataType | None:
    """The 8-bit integer type behind ``value`` when it is a ``DequantizeLinear`` output (looked
    for through ``Cast`` nodes, as written for half precision below opset 19); ``None`` for a
    float value."""
    while value is not None:
        node = value.producer()
        if node is None:
            break
        if node.op_type == "Cast":
            value = node.inputs[0]
            continue
        if node.op_type != "DequantizeLinear":
            return None
        # The codes' type, or (an untyped QuantizeLinear output) that of the zero point.
        typed = [t for t in map(_dtype, node.inputs[::2]) if t is not None]
        return typed[0] if typed and typed[0] in _INTEGER_CODES else None
    return None


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    """The element type of ``value``: declared, or that of its constant."""
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    return None if value.const_value is None else value.const_value.dtype


def saturating_matmuls(model: ir.Model) -> list[str]:
    """MatMul nodes whose integer product x86 CPUs without VNNI would clip: 8-bit integer
    activations times constant int8 weight codes beyond ``INT8_WEIGHT_LIMIT``."""
    found = []
    for node in model.graph:
        if node.op_type != "MatMul" or integer_codes(node.inputs[0]) is None:
            continue
        weight = node.inputs[1]
        if weight is None or integer_codes(weight) != ir.DataType.INT8:
            continue
        codes = producer_of(weight).inputs[0]
        if (
            is_constant(codes)
            and int(np.abs(constant(codes).numpy().astype(np.int16)).max()) > INT8_WEIGHT_LIMIT
        ):
            found.append(name_of(node))
    return found
