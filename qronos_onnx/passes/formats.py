"""Deployment formats: write every solved target's codes into the graph, exactly as solved.

- ``ToMatMulNBitsPass``: the MatMul/Gemm becomes ``com.microsoft.MatMulNBits`` (ONNX Runtime's
  weight-only kernel, CPU and CUDA).
- ``ToQDQPass``: the weight becomes an int4/uint4/int8/uint8 initializer behind an opset-21
  ``DequantizeLinear`` (blocked along K, or per output channel); ONNX Runtime fuses the pattern
  into MatMulNBits on CPU and CUDA, and any ONNX runtime can run it.

Requires: solved target nodes carry ``meta[QUANTIZED]`` and ``meta[TARGET]``
(``CalibrateSolvePass``).
Ensures: every solved target computes from its integer codes (a MatMulNBits, or a MatMul whose
weight is a DequantizeLinear output); no float weight of a solved target is left.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qronos_onnx.errors import QronosError
from qronos_onnx.ir.int8_kernels import INT8_WEIGHT_LIMIT, integer_codes, saturating_matmuls
from qronos_onnx.ir.packing import to_matmulnbits
from qronos_onnx.ir.targets import Target
from qronos_onnx.ir.values import constant, producer_op
from qronos_onnx.quant import QuantizedWeight

from .calibrate import QUANTIZED, TARGET

QDQ_OPSET = 21


def quantized_nodes(model: ir.Model) -> list[tuple[ir.Node, Target, QuantizedWeight]]:
    """Nodes the quantize pass solved, with their target and codes."""
    return [(n, n.meta[TARGET], n.meta[QUANTIZED]) for n in model.graph if QUANTIZED in n.meta]


def add_initializer(
    graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None
) -> ir.Value:
    """A new initializer named ``name`` (made unique)."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.Tensor(array, dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


def _drop_weight(graph: ir.Graph, name: str) -> None:
    value = graph.initializers.get(name)
    if value is not None and not value.uses():
        del graph.initializers[name]


class ToMatMulNBitsPass(ir.passes.InPlacePass):
    """Replace every solved MatMul/Gemm by a ``com.microsoft.MatMulNBits`` node.

    Args:
        accuracy_level: MatMulNBits' ``accuracy_level`` attribute (0-4; e.g. 4 lets the CPU
            kernel quantize A to int8); ``None`` leaves it unset.
    """

    def __init__(self, accuracy_level: int | None = None):
        super().__init__()
        if accuracy_level is not None and accuracy_level not in range(5):
            raise QronosError(f"accuracy_level must be 0..4, got {accuracy_level}")
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = quantized_nodes(model)
        for node, target, q in nodes:
            grid = q.grid
            weight = constant(graph.initializers[target.weight])
            try:
                t = to_matmulnbits(
                    q.codes.numpy(),
                    q.scales.numpy(),
                    None if q.zero_points is None else q.zero_points.numpy(),
                    grid.bits,
                    grid.group_size,
                    grid.symmetric,
                    weight.dtype.numpy(),
                )
            except ValueError as err:
                raise QronosError(
                    f"{target.name}: {err}; use format qdq or another group size"
                ) from err
            B = add_initializer(graph, f"{target.weight}_Q{t.bits}", t.B)
            scales = add_initializer(graph, f"{target.weight}_scales", t.scales)
            zero = (
                None
                if t.zero_points is None
                else add_initializer(graph, f"{target.weight}_zero_points", t.zero_points)
            )
            bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            if bias is not None and (
                bias.const_value is None or bias.const_value.size != target.out_features
            ):
                raise QronosError(
                    f"{target.name}: Gemm bias must be a constant of "
                    f"{target.out_features} values to become a MatMulNBits bias"
                )
            attrs = {"K": t.K, "N": t.N, "bits": t.bits, "block_size": t.block_size}
            if self.accuracy_level is not None:
                attrs["accuracy_level"] = self.accuracy_level
            new = ir.node(
                "MatMulNBits",
                [node.inputs[0], B, scales, zero, None, bias],
                attrs,
                domain="com.microsoft",
                name=node.name,
            )
            new.meta.update(node.meta)
            new.metadata_props.update(node.metadata_props)  # the layer's readable name
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [new], node.outputs, new.outputs
            )
            _drop_weight(graph, target.weight)
            if bias is not None and constant(bias).shape != (target.out_features,):
                bias.const_value = ir.Tensor(constant(bias).numpy().reshape(-1), name=bias.name)
        if nodes:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(nodes))

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n, _, _ in quantized_nodes(model) if n.op_type != "MatMulNBits"]
        if left:
            raise ir.passes.PostconditionError(f"solved targets left as float: {left}")


class ToQDQPass(ir.passes.InPlacePass):
    """Store every solved weight as integer codes behind an opset-21 ``DequantizeLinear``.

    The model is converted to opset 21 first (``onnxscript``'s version converter, which adapts
    ops whose semantics changed); a model it cannot convert is a clear error.

    Post-condition: every integer MatMul (8-bit activations) is exact on every x86 CPU
    (``ir.int8_kernels``): 8-bit symmetric codes read by integer activations are stored as
    uint8 with zero point 128 (the same grid), which ONNX Runtime runs with its u8 x u8
    kernels.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        converted = convert_opset(model, QDQ_OPSET)
        graph = model.graph
        nodes = quantized_nodes(model)
        for node, target, q in nodes:
            grid = q.grid
            wide = grid.bits > 4
            codes = q.codes.numpy()
            zero = None if q.zero_points is None else q.zero_points.numpy()
            if grid.symmetric and grid.bits == 8 and integer_codes(node.inputs[0]) is not None:
                codes = (codes.astype(np.int16) + 128).astype(np.uint8)
                zero = np.full(q.scales.shape, 128, np.uint8)
            if zero is None:
                dtype = ir.DataType.INT8 if wide else ir.DataType.INT4
                np_type = np.int8 if wide else ml_dtypes.int4
            else:
                dtype = ir.DataType.UINT8 if wide else ir.DataType.UINT4
                np_type = np.uint8 if wide else ml_dtypes.uint4
            scales = q.scales.numpy().astype(
                constant(graph.initializers[target.weight]).dtype.numpy()
            )
            # Stored layout: MatMul keeps W^T [K, N]; Gemm(transB=1) keeps W [N, K].
            k_axis = 1 if target.transposed else 0
            if not target.transposed:
                codes, scales = codes.T, scales.T
                zero = None if zero is None else zero.T
            attrs: dict = {}
            if grid.group_size is None:  # per output channel
                attrs["axis"] = 1 - k_axis
                scales = scales.reshape(-1)
                zero = None if zero is None else zero.reshape(-1)
            else:
                attrs["axis"] = k_axis
                attrs["block_size"] = grid.group_size
            x = add_initializer(graph, f"{target.weight}_q", codes.astype(np_type), dtype)
            s = add_initializer(graph, f"{target.weight}_scale", np.ascontiguousarray(scales))
            z = (
                None
                if zero is None
                else add_initializer(
                    graph,
                    f"{target.weight}_zero_point",
                    np.ascontiguousarray(zero).astype(np_type),
                    dtype,
                )
            )
            dq = ir.node("DequantizeLinear", [x, s, z], attrs, name=f"{node.name}_weight_dq")
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
            _drop_weight(graph, target.weight)
        return ir.passes.PassResult(model, modified=converted or bool(nodes))

    def ensures(self, model: ir.Model) -> None:
        left = [
            n.name
            for n, _, _ in quantized_nodes(model)
            if producer_op(n.inputs[1]) != "DequantizeLinear"
        ]
        if left:
            raise ir.passes.PostconditionError(f"solved targets left as float: {left}")
        saturating = saturating_matmuls(model)
        if saturating:
            raise ir.passes.PostconditionError(
                f"int8 weights beyond +-{INT8_WEIGHT_LIMIT} read by integer activations (x86 CPUs "
                f"without VNNI would saturate): {', '.join(saturating)}"
            )


def convert_opset(model: ir.Model, version: int) -> bool:
    """Convert the default-domain opset to at least ``version``, or say what blocks it;
    returns whether the model was converted.

    onnxscript's converter only adapts nodes from opset 18 on; from older opsets it hands the
    graph (large initializers left out) to ONNX's C++ converter, which also moves e.g. the
    ``axes`` of ReduceMean from attribute to input (opset 18). Its notice that it does so is
    silenced: the fallback is the intended path here.
    """
    current = model.opset_imports.get("", 1)
    if current >= version:
        return False
    from onnxscript import version_converter

    notices = logging.getLogger(version_converter.__name__)
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        version_converter.convert_version(model, version, fallback=True)
    except Exception as err:  # the converter raises several types; all mean "cannot convert"
        raise QronosError(
            f"cannot convert the model from opset {current} to {version} (needed "
            f"for QDQ int4): {err}; use format matmulnbits"
        ) from err
    finally:
        notices.setLevel(level)
    if model.opset_imports.get("", 1) < version:
        raise QronosError(f"opset conversion to {version} did not apply; use format matmulnbits")
    return True
