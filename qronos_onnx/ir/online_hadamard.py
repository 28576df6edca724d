"""Online Hadamard nodes: ``x -> x M`` in front of a layer, with ``M = (A kron B) / sqrt(n)``
applied through its Kronecker factors instead of a dense ``[n, n]`` constant.

For ``x`` of shape ``[..., n]`` and ``n = a b``, viewing the last axis as ``[a, b]`` (row-major,
the Kronecker product's index order) gives ``x (A kron B) = A^T X B``:

    Reshape(x, [-1, a, b]) -> MatMul(A^T, .) -> MatMul(., B / sqrt(n)) -> Reshape(., Shape(x))

``a (b + a)`` multiply-adds per ``n`` inputs, against ``n`` for a dense ``M``. The factor
constants are shared by every layer of the same width. The nodes carry the metadata
``qronos.role = online_hadamard``: they are part of the model, not layers to quantize.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from .values import name_of, shared_initializer

ROLE = "qronos.role"
ONLINE_HADAMARD = "online_hadamard"


def is_online_hadamard(node: ir.Node) -> bool:
    """Whether ``node`` is one of the inserted online Hadamard nodes."""
    return node.metadata_props.get(ROLE) == ONLINE_HADAMARD


def hadamard_source(value: ir.Value) -> ir.Value:
    """``x`` for the output of an online Hadamard inserted in front of ``x``; else ``value``."""
    node = value.producer()
    if node is None or not is_online_hadamard(node):
        return value
    if node.op_type == "MatMul":  # one factor: MatMul(x, M)
        return node.inputs[0] or value
    shape = node.inputs[1].producer() if node.inputs[1] is not None else None  # Reshape_back
    return (shape.inputs[0] if shape is not None else None) or value


def insert_online_hadamard(
    model: ir.Model, node: ir.Node, factors: list[np.ndarray], dtype: ir.DataType
) -> ir.Value:
    """Make input 0 of ``node`` ``x M`` instead of ``x``, with ``M = kron(factors) / sqrt(n)``
    (one or two ``+-1`` factors, float), computed in ``dtype``. Returns the new input."""
    x = node.inputs[0]
    assert x is not None
    n = math.prod(f.shape[0] for f in factors)
    base = f"{name_of(node)}/online_hadamard"
    scale = 1.0 / math.sqrt(n)
    new_nodes: list[ir.Node]
    if len(factors) == 1:
        m = shared_initializer(model, f"qronos.hadamard.{n}", factors[0] * scale, dtype)
        out = ir.Value(name=f"{base}/output")
        new_nodes = [ir.node("MatMul", [x, m], outputs=[out], name=f"{base}/MatMul")]
    elif len(factors) == 2:
        a, b = factors
        na, nb = a.shape[0], b.shape[0]
        left = shared_initializer(model, f"qronos.hadamard.{n}.{na}x{nb}.left", a.T, dtype)
        right = shared_initializer(model, f"qronos.hadamard.{n}.{na}x{nb}.right", b * scale, dtype)
        view = shared_initializer(
            model, f"qronos.hadamard.{n}.{na}x{nb}.shape", np.array([-1, na, nb]), ir.DataType.INT64
        )
        shape = ir.node("Shape", [x], name=f"{base}/Shape")
        grid = ir.node("Reshape", [x, view], name=f"{base}/Reshape")
        rows = ir.node("MatMul", [left, grid.outputs[0]], name=f"{base}/MatMul_left")
        cols = ir.node("MatMul", [rows.outputs[0], right], name=f"{base}/MatMul_right")
        out = ir.Value(name=f"{base}/output")
        back = ir.node(
            "Reshape",
            [cols.outputs[0], shape.outputs[0]],
            outputs=[out],
            name=f"{base}/Reshape_back",
        )
        new_nodes = [shape, grid, rows, cols, back]
    else:
        raise ValueError(f"an online Hadamard takes one or two factors, got {len(factors)}")
    for new in new_nodes:
        new.metadata_props[ROLE] = ONLINE_HADAMARD
        for v in new.outputs:
            v.name = v.name or f"{new.name}/output"
    out.dtype = dtype
    out.shape = x.shape
    model.graph.insert_before(node, new_nodes)
    node.replace_input_with(0, out)
    return out
