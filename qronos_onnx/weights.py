"""Layer weights between ONNX initializers and torch: ``W`` is ``[out, in]`` in torch (rows are
output channels), whatever the stored layout (a MatMul stores ``W^T``, a Gemm with
``transB=1`` stores ``W``).

Writes are copy-on-write: an initializer that other nodes read too (a tied embedding and
lm_head) is left as it is and the written node gets its own. A graph given a constant store
(``ir.values.keep_constants_in``) has what is written kept in it, memory-mapped, instead of in
the process's heap; ``transform_constant`` computes a new matrix block by block, so a
vocabulary-sized table never exists in float64 all at once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch

from qronos_onnx.errors import QronosError
from qronos_onnx.files.scratch import release_pages
from qronos_onnx.ir.targets import readable_name
from qronos_onnx.ir.values import constant, constant_store, kept, name_of


def weight_matrix(tensor: ir.TensorProtocol, transposed: bool, layer: str = "") -> torch.Tensor:
    """``W`` ``[out, in]`` from a stored weight (``transposed``: stored ``[out, in]``; else
    ``W^T``, a MatMul's ``[in, out]``), in its dtype.

    Half-precision weights stay half precision: the grid then rounds its scales to that dtype
    before solving (exported scales are stored in it); the solvers work in float32 anyway.

    Raises:
        QronosError: the weight has NaN or Inf entries (a broken model: nothing computed
            from it means anything); ``layer`` names its layer in the message.
    """
    matrix = to_torch(tensor)
    if not bool(torch.isfinite(matrix).all()):
        owner = f" of {layer}" if layer else ""
        raise QronosError(
            f"the weight{owner} ({tensor.name}) has NaN or Inf entries: the model is broken; "
            "check its export"
        )
    return matrix if transposed else matrix.T


def stored_layout(w: torch.Tensor, transposed: bool, dtype: np.dtype) -> np.ndarray:
    """``W`` ``[out, in]`` back to the stored layout and ``dtype``."""
    array = (w if transposed else w.T).contiguous().numpy()
    return array.astype(dtype, copy=False)


def to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    """A constant as a torch tensor of its dtype (a copy: the source may be memory-mapped)."""
    return _as_torch(np.array(tensor.numpy()), tensor.dtype)


def from_torch(t: torch.Tensor, dtype: ir.DataType) -> np.ndarray:
    """A torch tensor as a numpy array holding ``dtype`` (bfloat16 as its bits)."""
    if dtype == ir.DataType.BFLOAT16:
        return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
    return t.contiguous().numpy().astype(dtype.numpy(), copy=False)


def is_transposed(node: ir.Node) -> bool:
    """Whether a MatMul/Gemm stores its weight (input 1) as ``W`` ``[out, in]``."""
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def read_layer(node: ir.Node) -> torch.Tensor:
    """The ``W`` ``[out, in]`` of a MatMul/Gemm with a constant weight, in float64."""
    weight = constant(node.inputs[1])
    return weight_matrix(weight, is_transposed(node), readable_name(node)).to(torch.float64)


def write_layer(model: ir.Model, node: ir.Node, w: torch.Tensor) -> None:
    """Store ``W`` ``[out, in]`` as the node's weight, in its layout and dtype."""
    value = node.inputs[1]
    assert value is not None
    dtype = constant(value).dtype
    array = stored_layout(w.cpu(), is_transposed(node), np.dtype(np.float64))
    write_constant(model, node, 1, torch.from_numpy(array), dtype)


def write_constant(
    model: ir.Model, node: ir.Node, index: int, t: torch.Tensor, dtype: ir.DataType | None = None
) -> None:
    """Set input ``index`` of ``node`` (a constant) to ``t``, cast to ``dtype`` (default: the
    constant's own). The node gets its own initializer when others read the old one, or when
    the old one is not an initializer (a Constant node's output)."""
    value = node.inputs[index]
    assert value is not None
    dtype = dtype or constant(value).dtype
    _place(model, node, index, kept(model.graph, from_torch(t, dtype)), dtype)


#: Rows of float64 a ``transform_constant`` block holds (64 MB).
TRANSFORM_BLOCK_BYTES = 64 << 20
#: ``fn(rows)``: a ``[k, n]`` float64 block of rows to its new ``[k, n]`` values.
RowMap = Callable[[torch.Tensor], torch.Tensor]


def transform_layer(model: ir.Model, node: ir.Node, fn: RowMap, along: str = "in") -> None:
    """Replace the node's ``W`` ``[out, in]`` by ``fn`` applied to its rows (``along="in"``:
    ``fn`` maps ``[k, in]`` blocks of ``W``) or to the rows of ``W^T`` (``along="out"``: ``[k,
    out]`` blocks), whatever the stored layout (``transform_constant``)."""
    if along not in ("in", "out"):
        raise ValueError(f"along must be 'in' or 'out', got {along!r}")
    columns = (along == "in") != is_transposed(node)
    transform_constant(model, node, 1, fn, columns, readable_name(node))


def transform_constant(
    model: ir.Model,
    node: ir.Node,
    index: int,
    fn: RowMap,
    columns: bool = False,
    layer: str = "",
) -> None:
    """Replace input ``index`` of ``node`` (a constant ``[rows, cols]`` matrix) by ``fn``
    applied to its rows (``columns``: to its columns, as rows of its transpose), in float64
    blocks of ``TRANSFORM_BLOCK_BYTES``, written in the constant's dtype into the model's
    constant store (or memory). Copy-on-write like ``write_constant``.

    Raises:
        QronosError: the matrix has NaN or Inf entries (``layer`` names it).
    """
    value = node.inputs[index]
    assert value is not None
    source = constant(value)
    dtype = source.dtype
    stored = np.asarray(source.numpy())
    if stored.ndim != 2:
        raise ValueError(f"{name_of(value)} is not a matrix: shape {stored.shape}")
    like = from_torch(torch.zeros(0), dtype).dtype
    store = constant_store(model.graph, stored.size * like.itemsize)
    out = np.empty(stored.shape, like) if store is None else store.allocate(stored.shape, like)
    rows_in, rows_out = (stored.T, out.T) if columns else (stored, out)
    step = max(1, TRANSFORM_BLOCK_BYTES // (8 * rows_in.shape[1]))
    for r0 in range(0, rows_in.shape[0], step):
        block = _as_torch(np.array(rows_in[r0 : r0 + step]), dtype).double()
        if not bool(torch.isfinite(block).all()):
            owner = f" of {layer}" if layer else ""
            raise QronosError(
                f"the weight{owner} ({source.name}) has NaN or Inf entries: the model is "
                "broken; check its export"
            )
        rows_out[r0 : r0 + step] = from_torch(fn(block), dtype)
    release_pages(out)  # written: its pages need not stay resident
    _place(model, node, index, out, dtype)


def _as_torch(array: np.ndarray, dtype: ir.DataType) -> torch.Tensor:
    """A stored array as torch, sharing its memory (numpy has no bfloat16: go by the bits)."""
    if dtype == ir.DataType.BFLOAT16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _place(
    model: ir.Model, node: ir.Node, index: int, array: np.ndarray, dtype: ir.DataType
) -> None:
    """Make ``array`` input ``index`` of ``node`` (copy-on-write)."""
    value = node.inputs[index]
    assert value is not None
    shared = len(value.uses()) > 1 or not value.is_initializer()
    if not shared:
        value.const_value = ir.Tensor(array, dtype=dtype, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    name = _fresh_name(model, f"{name_of(value)}.{name_of(node)}")
    fresh = ir.Value(name=name, const_value=ir.Tensor(array, dtype=dtype, name=name))
    fresh.shape, fresh.dtype = ir.Shape(array.shape), dtype
    model.graph.register_initializer(fresh)
    node.replace_input_with(index, fresh)


def _fresh_name(model: ir.Model, base: str) -> str:
    names = set(model.graph.initializers) | {v.name for n in model.graph for v in n.outputs}
    name, k = base, 1
    while name in names:
        name, k = f"{base}.{k}", k + 1
    return name
