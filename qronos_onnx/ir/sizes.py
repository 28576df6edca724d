"""What the quantized weights of a model take on disk, read from the graph itself (any
quantizer's output: ours, ONNX Runtime GenAI's builder, ONNX Runtime's own).

A quantized weight is the constant inputs of a ``com.microsoft.MatMulNBits`` (``B``, scales,
zero points), of a ``DequantizeLinear`` whose input is a constant (codes, scale, zero point)
and of a ``com.microsoft.GatherBlockQuantized`` (data, scales, zero points), followed through
``Reshape`` nodes of constants; a tensor read by two of them (an embedding sharing the
lm_head's codes) counts once, for the first reader in graph order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir

from .targets import readable_name

#: The inputs holding a quantized weight, per operator.
_WEIGHT_INPUTS = {
    "MatMulNBits": (1, 2, 3),
    "DequantizeLinear": (0, 1, 2),
    "GatherBlockQuantized": (0, 2, 3),
}


@dataclass(frozen=True)
class StoredWeight:
    """One quantized weight.

    Attributes:
        layer: the reading node's readable name (``ir.targets.readable_name``).
        op_type: the operator reading it.
        bits: code width of its container (``bits`` of MatMulNBits / GatherBlockQuantized,
            the codes' type width of DequantizeLinear).
        block: block size (``block_size``; 0 when per channel or per tensor).
        bytes: stored bytes of the tensors not counted for an earlier weight.
    """

    layer: str
    op_type: str
    bits: int
    block: int
    bytes: int


def stored_weights(model: ir.Model) -> list[StoredWeight]:
    """Every quantized weight of ``model``, in graph order (see the module docstring)."""
    counted: set[int] = set()
    out = []
    for node in model.graph:
        inputs = _WEIGHT_INPUTS.get(node.op_type)
        if inputs is None:
            continue
        if not list(_constants(node.inputs[inputs[0]])):
            continue  # an activation's Q/DQ pair, or codes computed at run time
        tensors = [t for i in inputs if i < len(node.inputs) for t in _constants(node.inputs[i])]
        new = [t for t in tensors if id(t) not in counted]
        counted.update(id(t) for t in new)
        out.append(
            StoredWeight(
                readable_name(node),
                node.op_type,
                _bits(node, tensors),
                node.attributes.get_int("block_size", 0),
                sum(t.nbytes for t in new),
            )
        )
    return out


def _bits(node: ir.Node, tensors: list[ir.TensorProtocol]) -> int:
    if node.op_type != "DequantizeLinear":
        return node.attributes.get_int("bits", 4)
    return tensors[0].dtype.bitwidth


def _constants(value: ir.Value | None) -> Iterator[ir.TensorProtocol]:
    """The constant behind ``value``, itself or through ``Reshape`` nodes of constants."""
    while value is not None:
        if value.const_value is not None:
            yield value.const_value
            return
        producer = value.producer()
        if producer is None or producer.op_type != "Reshape":
            return
        value = producer.inputs[0]
