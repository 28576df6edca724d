"""Typed access to what ``onnx_ir`` leaves optional but a loaded graph always has.

``onnx_ir`` types a value's name, constant, producer and element type as optional, and a node's
missing inputs as ``None``. Where the code relies on one being there (the name of a graph value
or node, the constant of an initializer), these helpers return it, and raise ``ValueError``
naming the value when it is not: an invariant broken, not a user error.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qronos_onnx.files.scratch import ScratchArrays


def name_of(item: ir.Value | ir.Node | None) -> str:
    """The name of a value or node: a graph names its values and nodes when they are added
    (``load_model`` also renames repeated node names)."""
    if item is None:
        raise ValueError("a missing input has no name")
    if item.name is None:
        raise ValueError(f"unnamed {type(item).__name__}: {item!r}")
    return item.name


def is_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is present (not a missing optional input) and has a constant."""
    return value is not None and value.const_value is not None


def constant(value: ir.Value | None) -> ir.TensorProtocol:
    """The constant tensor of ``value`` (an initializer or a constant-folded value)."""
    if value is None:
        raise ValueError("a missing input has no constant")
    if value.const_value is None:
        raise ValueError(f"value {value.name!r} is not a constant")
    return value.const_value


def producer_of(value: ir.Value) -> ir.Node:
    """The node that computes ``value`` (not a graph input or an initializer)."""
    node = value.producer()
    if node is None:
        raise ValueError(f"value {value.name!r} is not computed by a node")
    return node


def producer_op(value: ir.Value | None) -> str | None:
    """The op type of the node that computes ``value``; ``None`` for a missing input, a graph
    input or an initializer."""
    node = None if value is None else value.producer()
    return None if node is None else node.op_type


def dtype_of(value: ir.Value) -> ir.DataType:
    """The declared element type of ``value``."""
    if value.dtype is None:
        raise ValueError(f"value {value.name!r} has no declared element type")
    return value.dtype


def tensor_shape(tensor: ir.TensorProtocol) -> ir.Shape:
    """The shape of a tensor as an ``ir.Shape``: the object itself for every ``onnx_ir``
    tensor (the protocol only promises a ``ShapeProtocol``), else a frozen copy."""
    shape = tensor.shape
    return shape if isinstance(shape, ir.Shape) else ir.Shape(shape.numpy(), frozen=True)


def static_shape(tensor: ir.TensorProtocol) -> tuple[int, ...]:
    """The dimensions of a tensor, as ints (a tensor's shape is always static)."""
    return tuple(tensor.shape.numpy())


def shared_initializer(
    model: ir.Model, name: str, array: np.ndarray, dtype: ir.DataType
) -> ir.Value:
    """The initializer ``name`` holding ``array`` as ``dtype``, registered on first use
    (constants that many nodes share, such as an online Hadamard's factors)."""
    existing = model.graph.initializers.get(name)
    if existing is not None:
        return existing
    array = np.asarray(array).astype(dtype.numpy(), copy=False)
    value = ir.Value(name=name, const_value=ir.Tensor(array, dtype=dtype, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), dtype
    model.graph.register_initializer(value)
    return value


def add_initializer(
    graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None
) -> ir.Value:
    """A new initializer named ``name`` (made unique)."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.Tensor(kept(graph, array), dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


#: ``graph.meta`` key: the ``ScratchArrays`` that new constants are kept in.
CONSTANT_STORE = "qronos.constant_store"
#: Smaller constants stay in memory (a file and a map each would cost more than they hold).
KEEP_MIN_BYTES = 1 << 16


def keep_constants_in(graph: ir.Graph, store: ScratchArrays | None) -> None:
    """Keep the constants written to ``graph`` from now on (``add_initializer``,
    ``weights.write_constant``) in ``store``, memory-mapped: file-backed pages, not the
    process's heap. ``None``: in memory again."""
    if store is None:
        graph.meta.pop(CONSTANT_STORE, None)
    else:
        graph.meta[CONSTANT_STORE] = store


def constant_store(graph: ir.Graph, nbytes: int) -> ScratchArrays | None:
    """Where a new constant of ``nbytes`` is kept: ``graph``'s store when it has one and the
    constant is at least ``KEEP_MIN_BYTES``; ``None``: in memory."""
    store = graph.meta.get(CONSTANT_STORE)
    return store if nbytes >= KEEP_MIN_BYTES else None


def kept(graph: ir.Graph, array: np.ndarray) -> np.ndarray:
    """``array`` as ``graph`` keeps new constants (``constant_store``)."""
    store = constant_store(graph, array.nbytes)
    return array if store is None else store.keep(array)


def drop_unused(graph: ir.Graph, name: str) -> None:
    """Remove the initializer ``name`` when nothing reads it any more."""
    value = graph.initializers.get(name)
    if value is not None and not value.uses():
        del graph.initializers[name]
