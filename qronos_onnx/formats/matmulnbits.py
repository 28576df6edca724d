"""The ``matmulnbits`` format: every solved MatMul/Gemm becomes ONNX Runtime's
``com.microsoft.MatMulNBits`` (its weight-only kernel, CPU and CUDA).

Codes are packed low bits first along K (``ir/packing.py``), ``block_size`` is the group size
(a power of two >= 16; a per-channel grid uses one block covering K, K padded to whole
blocks), scales in the weight's dtype, packed zero points for asymmetric grids. ONNX
Runtime's CPU kernel takes 2, 4 and 8 bits, so 3-bit codes are stored in the 4-bit container
and 5- to 7-bit codes in the 8-bit one.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from qronos_onnx.errors import QronosError
from qronos_onnx.ir.act_quant import ActQuant, bypass_kernel_quantizer
from qronos_onnx.ir.packing import block_size_for, container_bits, to_matmulnbits
from qronos_onnx.ir.values import add_initializer, constant, drop_unused
from qronos_onnx.options import Options
from qronos_onnx.passes.calibrate import quantized_nodes
from qronos_onnx.quant import Grid

from .base import Format
from .embedding import quantize_embedding

#: What MLAS's int8-activation kernel (``accuracy_level`` 4) takes on every x86 CPU.
INT8_KERNEL_BITS = (4, 8)
INT8_KERNEL_BLOCKS = (16, 32, 64, 128, 256)


class ToMatMulNBitsPass(ir.passes.InPlacePass):
    """Replace every solved MatMul/Gemm by a ``com.microsoft.MatMulNBits`` node.

    Args:
        accuracy_level: MatMulNBits' ``accuracy_level`` attribute: 1-3 written on every
            node; 4 (int8 blocks of A) on the nodes whose input the quantized stream
            quantized the kernel's way (``MatMulNBits.kernel_act_quant``), whose simulating
            nodes are removed; 0 or ``None``: unset.

    Requires: solved target nodes carry their codes (``passes.calibrate``).
    Ensures: no solved target is left as a float MatMul/Gemm.
    """

    def __init__(self, accuracy_level: int | None = None):
        super().__init__()
        self.accuracy_level = accuracy_level
        self.notes: list[str] = []  # what the report says about how layers were written

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = quantized_nodes(model)
        lm_head = None
        int8_inputs = 0
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
            if bypass_kernel_quantizer(graph, node):
                attrs["accuracy_level"] = 4
                int8_inputs += 1
            elif self.accuracy_level in (1, 2, 3):
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
            drop_unused(graph, target.weight)
            if bias is not None and constant(bias).shape != (target.out_features,):
                bias.const_value = ir.Tensor(constant(bias).numpy().reshape(-1), name=bias.name)
            if target.lm_head:
                lm_head = (new, grid)
        if int8_inputs:
            self.notes.append(
                f"accuracy_level 4 on {int8_inputs} of {len(nodes)} MatMulNBits: ONNX Runtime's "
                "CPU kernel quantizes their input to int8 blocks, as the calibration did"
            )
        if lm_head is not None:
            how = quantize_embedding(model, *lm_head)
            if how is not None:
                self.notes.append(how)
        if nodes:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(nodes))

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n, _, _ in quantized_nodes(model) if n.op_type != "MatMulNBits"]
        if left:
            raise ir.passes.PostconditionError(f"solved targets left as float: {left}")


class MatMulNBits(Format):
    name = "matmulnbits"
    summary = "ONNX Runtime's com.microsoft.MatMulNBits (2, 4, 8 bits; CPU and CUDA)"
    options = ("accuracy_level",)

    def check(self, grids: Sequence[Grid]) -> list[str]:
        notes = []
        for grid in grids:
            if grid.group_size is not None:
                try:
                    block_size_for(grid.group_size, grid.group_size)
                except ValueError as err:
                    raise QronosError(f"{err}: use format qdq, or group_size 16/32/64/128") from err
            if container_bits(grid.bits) != grid.bits:
                notes.append(
                    f"{grid.bits}-bit codes are stored in MatMulNBits' "
                    f"{container_bits(grid.bits)}-bit container (ONNX Runtime's kernel "
                    "takes 2, 4 and 8 bits); the file is that much larger"
                )
        return notes

    def kernel_act_quant(self, options: Options, grid: Grid, in_features: int) -> ActQuant | None:
        """At ``accuracy_level`` 4, the kernel's int8 blocks of the input where it has them."""
        block = block_size_for(grid.group_size, in_features)
        if (
            options.accuracy_level == 4
            and container_bits(grid.bits) in INT8_KERNEL_BITS
            and block in INT8_KERNEL_BLOCKS
        ):
            return ActQuant(8, "block", block=block)
        return None

    def stored_bytes(
        self, grid: Grid, out_features: int, in_features: int, scale_bytes: int
    ) -> int:
        """B ``[N, blocks, block * bits / 8]``, scales ``[N, blocks]``, and for asymmetric
        grids zero points packed per row ``[N, ceil(blocks * bits / 8)]`` (``to_matmulnbits``)."""
        bits = container_bits(grid.bits)
        block = block_size_for(grid.for_features(in_features).group_size, in_features)
        blocks = -(-in_features // block)
        zero_points = 0 if grid.symmetric else -(-blocks * bits // 8)
        return out_features * (blocks * block * bits // 8 + blocks * scale_bytes + zero_points)

    def rewrite_pass(self, options: Options) -> ir.passes.PassBase:
        return ToMatMulNBitsPass(options.accuracy_level)


FORMAT = MatMulNBits()
