"""The embedding table beside a quantized MatMulNBits lm_head, as ONNX Runtime's
``com.microsoft.GatherBlockQuantized`` (what ONNX Runtime GenAI's model builder writes).

- When the lm_head was given its own copy of the table (a tied lm_head, as ``torch.onnx``,
  Optimum and the builder export it; ``ir.targets.TIED_TABLE``) and nothing changed either
  since, the lookup reads the lm_head's own codes, scales and zero points through ``Reshape``
  nodes: one quantized table in the file.
- Otherwise (untied, or changed by rotations and norm folding) the table gets its own blocks,
  rounded to nearest on the lm_head's grid.

``GatherBlockQuantized`` (uint8 data, ``gather_axis`` 0, ``quantize_axis`` 1) reads a row's
codes packed low bits first, its scales ``[vocab, hidden / block]`` and packed zero points
``[vocab, ceil(blocks * bits / 8)]``, and without zero points takes ``2^(bits - 1)``, as
MatMulNBits does: the two share the same tensors. Its blocks must tile the row exactly, so a
table whose width is not a multiple of the block size stays float (a warning says so).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import torch

from qronos_onnx.errors import RecipeWarning
from qronos_onnx.ir.packing import block_size_for, container_bits, to_matmulnbits
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.targets import TIED_TABLE
from qronos_onnx.ir.values import add_initializer, constant, drop_unused, is_constant, name_of
from qronos_onnx.quant import Grid
from qronos_onnx.quant.solve import rtn_codes

#: Rows of the table rounded at a time (bounds the float32 working copy).
_ROWS = 8192


def embedding_lookup(model: ir.Model) -> tuple[ir.Node, ir.Value, bool] | None:
    """The Gather of the embedding table by ``input_ids``: ``(gather, table, transposed)``,
    where the Gather reads the constant table ``[vocab, hidden]`` itself, or a Transpose of a
    constant ``[hidden, vocab]`` (``transposed``); ``None`` when there is none."""
    ids_name = detect_signature(model).input_ids
    ids = next((v for v in model.graph.inputs if v.name == ids_name), None)
    for node in [] if ids is None else ids.consumers():
        data = node.inputs[0]
        if node.op_type != "Gather" or node.inputs[1] is not ids or data is None:
            continue
        if node.attributes.get_int("axis", 0) != 0:
            continue
        if is_constant(data) and len(constant(data).shape) == 2:
            return node, data, False
        producer = data.producer()
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and is_constant(producer.inputs[0])
            and len(constant(producer.inputs[0]).shape) == 2
        ):
            return node, producer.inputs[0], True  # type: ignore[return-value]
    return None


def quantize_embedding(model: ir.Model, lm_head: ir.Node, grid: Grid) -> str | None:
    """Replace the embedding lookup by a ``GatherBlockQuantized``.

    Args:
        lm_head: the lm_head's MatMulNBits node (inputs ``A, B, scales[, zero_points]``); its
            ``meta[TIED_TABLE]`` names the table its weight was copied from, if any.
        grid: the lm_head's grid (for a table of its own).
    Returns:
        How the table is stored (for the report), or ``None`` when there is no lookup.
    """
    found = embedding_lookup(model)
    if found is None:
        return None
    gather, table_value, table_transposed = found
    table = constant(table_value).numpy()
    table = table.T if table_transposed else table  # [vocab, hidden]
    vocab, hidden = table.shape
    shared = lm_head.meta.get(TIED_TABLE) == name_of(table_value)
    if shared:
        bits, block = lm_head.attributes.get_int("bits"), lm_head.attributes.get_int("block_size")
    else:
        bits, block = container_bits(grid.bits), block_size_for(grid.group_size, hidden)
    why = (
        f"its {hidden} columns are not a whole number of {block}-value blocks"
        if hidden % block
        else f"GatherBlockQuantized takes 4- and 8-bit codes, not {bits}"
        if bits not in (4, 8)
        else None
    )
    if why is not None:
        warnings.warn(f"the embedding table stays float: {why}", RecipeWarning, stacklevel=2)
        return None
    graph = model.graph
    if shared:
        data, scales, zeros = _shared_inputs(graph, lm_head, vocab, hidden, bits, block)
        how = f"embedding: GatherBlockQuantized sharing the lm_head's {bits}-bit codes"
    else:
        data, scales, zeros = _own_blocks(graph, name_of(table_value), table, grid, block)
        how = f"embedding: GatherBlockQuantized, its own {bits}-bit blocks of {block} (RTN)"
    new = ir.node(
        "GatherBlockQuantized",
        [data, gather.inputs[1], scales, zeros],
        {"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
        domain="com.microsoft",
        name=gather.name,
    )
    ir.convenience.replace_nodes_and_values(
        graph, gather, [gather], [new], gather.outputs, new.outputs
    )
    _drop_table(graph, table_value)
    return how


def _shared_inputs(graph, lm_head, vocab, hidden, bits, block):
    """The lm_head's codes, scales and zero points, reshaped for the lookup."""
    B, scales, zeros = (lm_head.inputs[i] if i < len(lm_head.inputs) else None for i in (1, 2, 3))
    prefix = f"{name_of(B)}_as_table"
    nodes: list[ir.Node] = []

    def reshape(value: ir.Value | None, dims: list[int], suffix: str) -> ir.Value | None:
        if value is None:
            return None
        shape = add_initializer(graph, f"{prefix}_{suffix}_shape", np.array(dims, np.int64))
        node = ir.node("Reshape", [value, shape], name=f"{prefix}/{suffix}")
        nodes.append(node)
        return node.outputs[0]

    out = (
        reshape(B, [vocab, hidden * bits // 8], "data"),
        reshape(scales, [vocab, hidden // block], "scales"),
        reshape(zeros, [vocab, -1], "zero_points"),
    )
    graph.insert_before(next(iter(graph)), nodes)
    return out


def _own_blocks(graph, name, table, grid: Grid, block):
    """The table rounded to nearest on ``grid`` (blocks of ``block``), packed for the lookup,
    a block of rows at a time."""
    vocab, hidden = table.shape
    grid = grid.for_features(hidden)
    bits = container_bits(grid.bits)
    blocks = hidden // block
    packed = np.empty((vocab, hidden * bits // 8), np.uint8)
    scales = np.empty((vocab, blocks), table.dtype)
    zeros = None if grid.symmetric else np.empty((vocab, -(-blocks * bits // 8)), np.uint8)
    for i in range(0, vocab, _ROWS):
        rows = torch.from_numpy(np.asarray(table[i : i + _ROWS], np.float32))
        s, z = grid.fit(rows)
        codes = rtn_codes(rows, grid, s, z)
        z_np = None if z is None else z.numpy()
        t = to_matmulnbits(
            codes.numpy(), s.numpy(), z_np, grid.bits, grid.group_size, grid.symmetric, table.dtype
        )
        n = rows.shape[0]
        packed[i : i + n] = t.B.reshape(n, -1)
        scales[i : i + n] = t.scales.reshape(n, -1)
        if zeros is not None and t.zero_points is not None:
            zeros[i : i + n] = t.zero_points.reshape(n, -1)
    return (
        add_initializer(graph, f"{name}_Q{bits}", packed),
        add_initializer(graph, f"{name}_scales", scales),
        None if zeros is None else add_initializer(graph, f"{name}_zero_points", zeros),
    )


def _drop_table(graph: ir.Graph, table: ir.Value) -> None:
    """Remove the float table, and the Transpose reading it, once nothing reads them."""
    for user, _ in list(table.uses()):
        if user.op_type == "Transpose" and not any(out.uses() for out in user.outputs):
            graph.remove(user, safe=True)
    drop_unused(graph, name_of(table))
