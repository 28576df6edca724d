"""ONNX Runtime's fused attention operators, as exports for ONNX Runtime write them:
``com.microsoft.GroupQueryAttention`` (ONNX Runtime GenAI's model builder: rotary embedding
inside, the KV cache as inputs, q/k/v often packed into one projection) and
``com.microsoft.MultiHeadAttention``.

What the rest of the package needs from them: the head counts and head size (a builder's KV
cache inputs leave the head size symbolic), and how a packed QKV projection's output rows
split into the query, key and value parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from .values import constant, is_constant, static_shape

ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention")

#: Ops a value may pass through on its way from a projection to the attention node.
_PASSTHROUGH = ("Cast", "Identity", "Reshape")


@dataclass(frozen=True)
class Attention:
    """One fused attention node.

    Attributes:
        node: the node.
        num_heads, kv_heads: query heads and key/value heads (equal without grouping).
        head_size: features per head.
        packed: the query input carries q, k and v (the key and value inputs are empty).
    """

    node: ir.Node
    num_heads: int
    kv_heads: int
    head_size: int
    packed: bool

    def qkv_parts(self) -> tuple[tuple[str, int, int], ...]:
        """``(name, first row, end row)`` of q, k and v in a packed projection's output."""
        q, kv = self.num_heads * self.head_size, self.kv_heads * self.head_size
        return (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv))


def attention_nodes(model: ir.Model) -> list[Attention]:
    """Every fused attention node whose head size can be told from the graph."""
    found = []
    for node in model.graph:
        if node.op_type in ATTENTION_OPS and node.domain == "com.microsoft":
            attention = _describe(node)
            if attention is not None:
                found.append(attention)
    return found


def _describe(node: ir.Node) -> Attention | None:
    num_heads = node.attributes.get_int("num_heads", 0)
    if num_heads <= 0:
        return None
    kv_heads = node.attributes.get_int("kv_num_heads", num_heads) or num_heads
    inputs = list(node.inputs) + [None] * 3
    query, key = inputs[0], inputs[1]
    packed = key is None
    width = _features(query)
    if width is None:
        return None
    heads = num_heads + 2 * kv_heads if packed else num_heads
    if width % heads:
        return None
    return Attention(node, num_heads, kv_heads, width // heads, packed)


def _features(value: ir.Value | None) -> int | None:
    """The static last dimension of ``value``, from its shape or from the constant weight of
    the MatMul/Gemm computing it (through casts, reshapes and a bias Add)."""
    while value is not None:
        if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
            return value.shape[-1]
        node = value.producer()
        if node is None:
            return None
        if node.op_type in ("MatMul", "Gemm") and is_constant(node.inputs[1]):
            shape = static_shape(constant(node.inputs[1]))
            transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
            return shape[0] if transposed else shape[-1]
        if node.op_type in _PASSTHROUGH or node.op_type == "Add":
            value = next((v for v in node.inputs if v is not None and not is_constant(v)), None)
            continue
        return None
    return None


def cache_reader(value: ir.Value) -> Attention | None:
    """The attention node that reads a KV-cache input (directly or through a cast)."""
    todo = [value]
    while todo:
        current = todo.pop()
        for node in current.consumers():
            if node.op_type in _PASSTHROUGH:
                todo.extend(node.outputs)
            elif node.op_type in ATTENTION_OPS:
                return _describe(node)
    return None
