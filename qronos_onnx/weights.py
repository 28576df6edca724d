"""Layer weights between ONNX initializers and torch: ``W`` is ``[out, in]`` in torch (rows are
output channels), whatever the stored layout (a MatMul stores ``W^T``, a Gemm with
``transB=1`` stores ``W``).

Writes are copy-on-write: an initializer that other nodes read too (a tied embedding and
lm_head) is left as it is and the written node gets its own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from qronos_onnx.errors import QronosError
from qronos_onnx.ir.targets import readable_name
from qronos_onnx.ir.values import constant, name_of


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
    if tensor.dtype == ir.DataType.BFLOAT16:  # numpy has no bfloat16: go by the bits
        bits = np.array(tensor.numpy()).view(np.uint16)
        return torch.from_numpy(bits).view(torch.bfloat16)
    return torch.from_numpy(np.array(tensor.numpy()))


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
    array = from_torch(t, dtype)
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
