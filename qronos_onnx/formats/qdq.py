"""The ``qdq`` format: every solved weight is stored as integer codes behind an opset-21
``DequantizeLinear`` (int4/uint4 up to 4 bits, int8/uint8 above; blocked along K with
``block_size``, or per output channel), read by the original MatMul. Any ONNX runtime runs it;
ONNX Runtime fuses the pattern into MatMulNBits on CPU and CUDA.

The model is converted to opset 21 first (``onnxscript``'s version converter, which adapts ops
whose semantics changed); a model it cannot convert is a clear error. 8-bit symmetric codes
read by integer activations are stored as uint8 with zero point 128 (the same grid), which
ONNX Runtime runs exactly with its u8 x u8 kernels on every x86 CPU (``ir.int8_kernels``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qronos_onnx.errors import QronosError
from qronos_onnx.ir.int8_kernels import INT8_WEIGHT_LIMIT, integer_codes, saturating_matmuls
from qronos_onnx.ir.values import add_initializer, constant, drop_unused, producer_op
from qronos_onnx.options import Options
from qronos_onnx.passes.calibrate import quantized_nodes
from qronos_onnx.quant import Grid

from .base import Format

QDQ_OPSET = 21


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
            drop_unused(graph, target.weight)
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


class QDQ(Format):
    name = "qdq"
    summary = (
        "opset-21 DequantizeLinear int4/int8 weights read by the original MatMul (any ONNX runtime)"
    )

    def check(self, grids: Sequence[Grid]) -> list[str]:
        return [
            f"{g.bits}-bit codes are stored as {'int4' if g.bits < 4 else 'int8'}"
            for g in grids
            if g.bits not in (4, 8)
        ]

    def stored_bytes(
        self, grid: Grid, out_features: int, in_features: int, scale_bytes: int
    ) -> int:
        """int4/uint4 (up to 4 bits, two per byte) or int8/uint8 codes, one scale per group
        and, for asymmetric grids, one zero point per group of the codes' type. (8-bit
        symmetric codes read by integer activations gain a uint8 zero point: W8A8 is not
        budgeted.)"""
        bits = 4 if grid.bits <= 4 else 8
        groups = out_features * grid.n_groups(in_features)
        zero_points = 0 if grid.symmetric else -(-groups * bits // 8)
        return -(-out_features * in_features * bits // 8) + groups * scale_bytes + zero_points

    def rewrite_pass(self, options: Options) -> ir.passes.PassBase:
        return ToQDQPass()


FORMAT = QDQ()
