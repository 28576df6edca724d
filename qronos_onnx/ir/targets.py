"""Find the layers to quantize: MatMul/Gemm nodes whose weight is a constant 2-D tensor.

A *target* multiplies an activation ``A`` by a weight initializer. In ONNX a MatMul stores
``W^T`` (``[in, out]``); a Gemm with ``transB=1`` stores ``W`` (``[out, in]``). Targets that read
the same activation form a *group* (q/k/v, gate/up) and are calibrated together. Everything else
that looks like a layer is reported as skipped, with the reason.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qronos_onnx.errors import QronosError

from .attention import attention_nodes
from .online_hadamard import is_online_hadamard
from .patterns import check_patterns, matches
from .values import constant, is_constant, name_of, static_shape

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
_LAYER_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Target:
    """One quantizable layer.

    Attributes:
        node: ONNX node name (unique in the graph).
        name: readable name: the exporter's module path when recorded, else the node name.
        op_type: ``MatMul`` or ``Gemm``.
        input: the activation value ``A`` (``[..., in_features]``).
        weight: the weight initializer.
        transposed: the weight is stored ``[out, in]`` (Gemm ``transB=1``); else ``[in, out]``.
        in_features, out_features: ``W`` is ``[out_features, in_features]``.
        output: the layer's output value.
        lm_head: the layer computes the logits.
        bias: the Gemm bias input, if any.
        parts: ``(name, first row, end row)`` of the outputs a fused projection packs, such as
            a QKV projection read by a GroupQueryAttention (``q``, ``k``, ``v``); empty for a
            plain layer.
    """

    node: str
    name: str
    op_type: str
    input: str
    weight: str
    transposed: bool
    in_features: int
    out_features: int
    output: str
    lm_head: bool
    bias: str | None = None
    parts: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A MatMul/Gemm that is not quantized, and why."""

    node: str
    name: str
    reason: str


@dataclass(frozen=True)
class TargetGroup:
    """Targets that read the same activation; calibrated and solved together.

    Attributes:
        input: the value the targets read.
        targets: the targets, in graph order.
        source: when ``input`` is an activation quantizer's output, the value it quantizes:
            the float network reads ``source`` where the quantized one reads ``input``.
    """

    input: str
    targets: tuple[Target, ...]
    source: str | None = None

    @property
    def in_features(self) -> int:
        return self.targets[0].in_features


#: A node named by its module's path, as Optimum and GenAI's model builder name them:
#: ``/model/layers.0/mlp/down_proj/MatMul`` (possibly with a suffix made unique on load).
_PATH_NAME = re.compile(r"^/(.+)/(MatMul|Gemm)(_\d+)?$")


def readable_name(node: ir.Node) -> str:
    """The module path of a layer (``model.layers.0.mlp.down_proj``): as the PyTorch exporter
    recorded it, or read from a path-like node name (Optimum, GenAI's model builder); else the
    node name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            parts = None
        if isinstance(parts, list) and len(parts) >= 2 and parts[-2]:
            return str(parts[-2])
    match = _PATH_NAME.match(node.name or "")
    if match:
        return match.group(1).replace("/", ".")
    return node.name or "<unnamed>"


#: The skip reason of a MatMul/Gemm whose weight a DequantizeLinear produces.
ALREADY_QUANTIZED = "already quantized (weight from a DequantizeLinear)"


def find_targets(
    model: ir.Model,
    *,
    include_lm_head: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[list[TargetGroup], list[Skipped]]:
    """All targets of ``model``, grouped by input in graph order, and the skipped layers.

    ``include`` (when given: only these) and ``exclude`` take globs or ``re:`` regexes, matched
    against readable and node names.
    """
    check_patterns(include, "include")
    check_patterns(exclude, "exclude")
    logits = _logits_producers(model)
    targets: list[Target] = []
    skipped: list[Skipped] = []
    packed_queries = {name_of(a.node.inputs[0]): a for a in attention_nodes(model) if a.packed}
    for node in model.graph:
        if node.op_type not in _LAYER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if is_online_hadamard(node):
            continue  # part of the rotated model's function, not a layer
        name = readable_name(node)
        target, reason = _as_target(node, name, node in logits)
        if target is not None and target.lm_head and not include_lm_head:
            reason = "lm_head (not quantized by default)"
        if reason is None:
            reason = _pattern_reason(node, include, exclude)
        if reason is None:
            assert target is not None  # _as_target gives a target or the reason for none
            packed = packed_queries.get(name_of(node.outputs[0]))
            if packed is not None:
                target = dataclasses.replace(target, parts=packed.qkv_parts())
            targets.append(target)
        else:
            skipped.append(Skipped(name_of(node), name, reason))
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.input, []).append(t)
    values = {v.name: v for n in model.graph for v in n.outputs}
    return [
        TargetGroup(k, tuple(v), _act_quant_source(values.get(k))) for k, v in groups.items()
    ], skipped


#: The skip reasons of layers that ``include`` / ``exclude`` patterns leave out.
NOT_INCLUDED = "not included by pattern"
EXCLUDED = "excluded by pattern"
PATTERN_REASONS = (NOT_INCLUDED, EXCLUDED)


def require_targets(
    model: ir.Model, groups: Sequence[TargetGroup], skipped: Sequence[Skipped]
) -> None:
    """Refuse a model with nothing left to quantize, saying why: already quantized, every
    layer left out by the include / exclude patterns, or no layer at all."""
    if groups:
        return
    packed = sum(n.op_type == "MatMulNBits" for n in model.graph)
    dequantized = sum(s.reason == ALREADY_QUANTIZED for s in skipped)
    if packed or dequantized:
        found = ", ".join(
            f"{n} {what}"
            for n, what in (
                (packed, "MatMulNBits"),
                (dequantized, "MatMul on DequantizeLinear weights"),
            )
            if n
        )
        raise QronosError(
            f"the model is already quantized ({found}) and has no float layer "
            "left to quantize: start from the float model"
        )
    left_out = [s for s in skipped if s.reason in PATTERN_REASONS]
    if left_out:
        raise QronosError(
            f"the include/exclude patterns leave out all {len(left_out)} "
            "quantizable layers; `qronos-onnx inspect MODEL` lists their names"
        )
    raise QronosError(
        f"no quantizable MatMul/Gemm with a constant 2-D weight was found ({len(skipped)} skipped)"
    )


def _pattern_reason(node: ir.Node, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    """Why ``include`` / ``exclude`` leave ``node`` out, or ``None`` when they keep it."""
    name = readable_name(node)
    if include and not matches(include, name, name_of(node)):
        return NOT_INCLUDED
    if matches(exclude, name, name_of(node)):
        return EXCLUDED
    return None


#: ``Value.meta`` key set on an activation quantizer's output: the name of the value quantized.
ACT_QUANT_SOURCE = "qronos.act_quant_source"


def _act_quant_source(value: ir.Value | None) -> str | None:
    return None if value is None else value.meta.get(ACT_QUANT_SOURCE)


def tied_lm_head(
    model: ir.Model, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[ir.Node, ir.Value, bool] | None:
    """The lm_head whose weight is the embedding table, unless the ``include`` / ``exclude``
    patterns leave it out: ``(lm_head node, table, transposed)``, where the lm_head reads a
    Transpose of the table (``torch.onnx``) or the table itself, which the embedding reads
    through a Transpose (ONNX Runtime GenAI's model builder); else ``None``."""
    for node in _logits_producers(model):
        if _pattern_reason(node, include, exclude):
            continue
        weight = node.inputs[1]
        if weight is None:
            continue
        if is_constant(weight):
            if len(weight.uses()) > 1:
                return node, weight, False
            continue
        producer = weight.producer()
        table = None if producer is None else producer.inputs[0]
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and table is not None
            and is_constant(table)
            and list(producer.attributes.get_ints("perm", [1, 0])) == [1, 0]
        ):
            return node, table, True
    return None


#: ``Node.meta`` key on an lm_head that ``untie_lm_head`` gave its own weight: the embedding
#: table's name, which that weight equals until a transform (rotations) changes either.
TIED_TABLE = "qronos.tied_table"


def untie_lm_head(
    model: ir.Model, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> bool:
    """Give a tied lm_head (``tied_lm_head``) its own weight initializer, so that it can be
    quantized without touching the embedding; nothing is done when the ``include`` / ``exclude``
    patterns leave it out (the copy would only add a float weight). Returns whether it was
    untied."""
    tied = tied_lm_head(model, include, exclude)
    if tied is None:
        return False
    node, source, transpose = tied
    table = constant(source)
    name = f"{name_of(source)}.lm_head"
    dims = static_shape(table)

    def copy() -> ir.Tensor:
        array = table.numpy().T if transpose else table.numpy()
        return ir.Tensor(np.ascontiguousarray(array), name=name)

    shape = ir.Shape([dims[1], dims[0]] if transpose else list(dims))
    untied = ir.Value(
        name=name, const_value=ir.LazyTensor(copy, dtype=table.dtype, shape=shape, name=name)
    )
    untied.dtype, untied.shape = table.dtype, shape
    model.graph.register_initializer(untied)
    previous = node.inputs[1]
    node.replace_input_with(1, untied)
    node.meta[TIED_TABLE] = name_of(source)
    producer = previous.producer() if previous is not None else None
    if producer is not None and not producer.outputs[0].uses():
        model.graph.remove(producer, safe=True)
    return True


def _as_target(node: ir.Node, name: str, lm_head: bool) -> tuple[Target | None, str | None]:
    """The node as a target, or the reason it is not one."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None, "missing inputs"
    a, b = node.inputs[0], node.inputs[1]
    transposed = False
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get("transA") is not None and attrs["transA"].value:
            return None, "Gemm with transA=1"
        if attrs.get("alpha") is not None and attrs["alpha"].value != 1.0:
            return None, "Gemm with alpha != 1"
        if (
            len(node.inputs) > 2
            and node.inputs[2] is not None
            and attrs.get("beta") is not None
            and attrs["beta"].value != 1.0
        ):
            return None, "Gemm with beta != 1"
        transposed = bool(attrs["transB"].value) if attrs.get("transB") is not None else False
    if b.const_value is None:
        producer = b.producer()
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and is_constant(producer.inputs[0])
        ):
            what = "tied lm_head" if lm_head else "weight is a Transpose of a shared initializer"
            return None, f"{what} (MatMul on a Transpose of an initializer)"
        if producer is not None and producer.op_type == "DequantizeLinear":
            return None, ALREADY_QUANTIZED
        return None, "no constant weight (activation x activation product)"
    if a.const_value is not None:
        return None, "constant input activation"
    if b.const_value.dtype not in _FLOAT_TYPES:
        return None, f"weight dtype {b.const_value.dtype} is not a float type"
    shape = static_shape(b.const_value)
    if len(shape) != 2:
        return None, f"weight has rank {len(shape)}, not 2"
    if 0 in shape:
        return None, f"weight has no entries (shape {list(shape)})"
    if len(b.uses()) != 1:
        if lm_head:
            return None, "tied lm_head (its weight is the embedding's, read through a Transpose)"
        return None, f"weight is shared with {len(b.uses()) - 1} other node(s)"
    in_f, out_f = (shape[1], shape[0]) if transposed else shape
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    return Target(
        node=name_of(node),
        name=name,
        op_type=node.op_type,
        input=name_of(a),
        weight=name_of(b),
        transposed=transposed,
        in_features=int(in_f),
        out_features=int(out_f),
        output=name_of(node.outputs[0]),
        lm_head=lm_head,
        bias=None if bias is None else bias.name,
    ), None


def _logits_producers(model: ir.Model) -> set[ir.Node]:
    """The MatMul/Gemm that computes ``logits``: walking back from the output through the first
    non-constant input of each node (reshapes, casts, bias, soft-capping) to a MatMul/Gemm."""
    found: set[ir.Node] = set()
    for value in model.graph.outputs:
        if value.name != "logits":
            continue
        for _ in range(64):
            node = value.producer()
            if node is None:
                break
            if node.op_type in _LAYER_OPS:
                found.add(node)
                break
            inputs = [v for v in node.inputs if v is not None and v.const_value is None]
            if not inputs:
                break
            value = inputs[0]
    return found
