"""Where the rotations go: the residual stream, attention heads and MLP down projections.

A pre-norm decoder (Llama, Qwen, Mistral, SmolLM, Gemma 1) keeps a residual stream ``r``
(``[..., d_model]``): the embedding writes it, every block reads it through an RMSNorm and adds
a projection back into it, and a last RMSNorm feeds the lm_head. An orthogonal ``Q`` applied to
every value of the stream (``r -> r Q``) leaves the network's function unchanged when
everything that touches the stream is one of:

- the embedding table (its rows are rotated),
- a *writer*: a MatMul/Gemm with a constant weight (and optional constant bias) whose output
  is added into the stream (its outputs are rotated),
- an RMSNorm without a scale (``||r Q|| = ||r||``), whose readers are MatMul/Gemm layers with
  constant weights (their inputs are rotated back),
- casts and multiplications by a scalar constant (Gemma scales its embedding by sqrt(d)).

``residual_stream`` finds that structure or says, in one line, what breaks it (``NotRotatable``):
a norm after a writer (Gemma 2/3), a residual value read by something else, a model output.
This module only describes the graph; ``passes/rotate.py`` changes the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from .attention import attention_nodes
from .norms import NORM_OPS, Norm, find_norms
from .signature import LLMSignature
from .values import constant, is_constant, name_of, static_shape

#: Ops a value keeps its meaning through (on the residual stream, and between a projection
#: and what reads it).
_PASS = ("Cast", "Identity")
#: Ops between an attention's Softmax and the MatMul with its values, at most.
_SOFTMAX_TO_MATMUL = 3
#: Ops that compute an MLP's inner activation (the input of its down projection).
ACTIVATION_OPS = (
    "Mul",
    "Gelu",
    "FastGelu",
    "QuickGelu",
    "BiasGelu",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Silu",
    "Swish",
    "Softplus",
)
_LAYERS = ("MatMul", "Gemm")


class NotRotatable(Exception):
    """The graph's structure does not admit a rotation; the message says why (one line)."""


@dataclass(frozen=True)
class StreamWriter:
    """A projection added into the residual stream.

    Attributes:
        node: the MatMul/Gemm.
        bias: a constant added to its output (a Gemm's ``C`` or an ``Add``), else ``None``.
        bias_node: the node that reads ``bias`` (the Gemm, or the ``Add``).
    """

    node: ir.Node
    bias: ir.Value | None = None
    bias_node: ir.Node | None = None


@dataclass
class ResidualStream:
    """The residual stream of a pre-norm decoder.

    Attributes:
        d_model: its width.
        embedding: the ``Gather`` that reads the table.
        norms: the RMSNorms that read the stream.
        readers: the MatMul/Gemm layers that read a norm's output (q/k/v, gate/up, lm_head).
        writers: the projections added into the stream (o_proj, down_proj).
        values: the stream's values, in graph order.
    """

    d_model: int
    embedding: ir.Node
    norms: list[Norm] = field(default_factory=list)
    readers: list[ir.Node] = field(default_factory=list)
    writers: list[StreamWriter] = field(default_factory=list)
    values: list[ir.Value] = field(default_factory=list)


@dataclass(frozen=True)
class HeadPair:
    """The value projection and output projection of one attention.

    Attributes:
        v_proj: the MatMul/Gemm computing the values (a packed QKV projection for a fused
            attention that takes q, k and v in one input).
        v_features: ``(first, end)`` of the value features among ``v_proj``'s outputs.
        v_bias: a constant ``Add``-ed to ``v_proj``'s output (all of it), else ``None``.
        o_proj: the MatMul/Gemm that reads the attention's output.
        head_dim: features per head.
    """

    v_proj: ir.Node
    v_features: tuple[int, int]
    v_bias: ir.Value | None
    o_proj: ir.Node
    head_dim: int


def layer_features(node: ir.Node) -> tuple[int, int]:
    """``(in_features, out_features)`` of a MatMul/Gemm with a constant 2-D weight."""
    shape = static_shape(constant(node.inputs[1]))
    transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def is_layer(node: ir.Node, reads: ir.Value | None = None) -> bool:
    """A MatMul/Gemm with a constant 2-D weight (reading ``reads`` as its activation)."""
    if node.op_type not in _LAYERS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    if not is_constant(weight) or len(constant(weight).shape) != 2:
        return False
    if node.op_type == "Gemm" and node.attributes.get_int("transA"):
        return False
    return reads is None or node.inputs[0] is reads


def residual_stream(
    model: ir.Model, signature: LLMSignature, tied_head: ir.Node | None = None
) -> ResidualStream:
    """The residual stream of ``model``.

    ``tied_head``: an lm_head that reads the embedding table through a Transpose (not a
    constant weight yet), accepted as a reader: the stream as it is once it is untied.

    Raises:
        NotRotatable: the graph is not a pre-norm decoder as described in the module
            docstring; the message names the value or node that breaks it.
    """
    embedding = _embedding(model, signature)
    d = static_shape(_table(embedding))[1]
    stream = ResidualStream(d, embedding)
    norms = {n.node: n for n in find_norms(model)}
    seen: set[ir.Value] = set()
    todo = [embedding.outputs[0]]
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        if value.is_graph_output():
            raise NotRotatable(f"the residual stream is a model output ({value.name})")
        for node in value.consumers():
            todo.extend(_follow(node, value, norms, stream, seen))
    order = {node: i for i, node in enumerate(model.graph)}
    stream.values = sorted(seen, key=lambda v: order.get(v.producer(), -1))  # type: ignore[arg-type]
    stream.norms.sort(key=lambda n: order[n.node])
    for norm in stream.norms:
        for node in norm.output.consumers():
            if node is tied_head:
                continue
            if not is_layer(node, norm.output) or layer_features(node)[0] != d:
                raise NotRotatable(
                    f"{node.name} ({node.op_type}) reads the output of the norm "
                    f"{norm.node.name}; only MatMul/Gemm layers with constant weights may"
                )
            stream.readers.append(node)
        if norm.output.is_graph_output():
            raise NotRotatable(f"the norm output {norm.output.name} is a model output")
    for writer in stream.writers:
        if layer_features(writer.node)[1] != d:
            raise NotRotatable(f"the projection {writer.node.name} does not write {d} features")
    if not stream.readers:
        raise NotRotatable("no layer reads the residual stream through an RMSNorm")
    return stream


def _follow(
    node: ir.Node,
    value: ir.Value,
    norms: dict[ir.Node, Norm],
    stream: ResidualStream,
    seen: set[ir.Value],
) -> list[ir.Value]:
    """Check one consumer of a residual value; return the residual values it produces."""
    norm = norms.get(node)
    if norm is not None and value in norm.inputs:
        if norm not in stream.norms:
            stream.norms.append(norm)
            if norm.skip:
                other = next((v for v in norm.inputs if v is not value), None)
                if other is not None:
                    _add_writer(stream, other, node, seen)
        return [norm.total] if norm.total is not None else []
    if node.op_type in _PASS:
        return list(node.outputs)
    if node.op_type == "Mul" and _scalar_other(node, value):
        return list(node.outputs)
    if node.op_type == "Add" and len(node.inputs) == 2:
        other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
        if other is not None:
            _add_writer(stream, other, node, seen)
        return list(node.outputs)
    raise NotRotatable(
        f"{node.name} ({node.op_type}) reads the residual stream ({value.name}); only "
        "RMSNorms and residual Adds may"
    )


def _add_writer(stream: ResidualStream, value: ir.Value, add: ir.Node, seen: set) -> None:
    """Record the projection behind ``value``, which ``add`` adds into the stream."""
    if value in seen:
        return  # the stream added to itself: both sides are rotated alike
    writer = _writer(value)
    if writer is None:
        producer = value.producer()
        what = "a model input" if producer is None else f"{producer.op_type} {producer.name}"
        post_norm = producer is not None and (producer.domain or "", producer.op_type) in NORM_OPS
        hint = " (a norm after the projection, as in Gemma 2 and 3)" if post_norm else ""
        raise NotRotatable(
            f"{add.name} adds {value.name} ({what}) into the residual stream; only projections "
            f"(MatMul/Gemm with constant weights) may{hint}"
        )
    for v in _writer_values(writer, value):
        readers = [n for n in v.consumers() if n is not add and n is not writer.bias_node]
        if readers or v.is_graph_output():
            who = readers[0].name if readers else "a model output"
            raise NotRotatable(f"the projection output {v.name} is also read by {who}")
    if all(w.node is not writer.node for w in stream.writers):
        stream.writers.append(writer)


def _writer(value: ir.Value) -> StreamWriter | None:
    """The projection computing ``value`` (through casts and a constant bias ``Add``)."""
    node = value.producer()
    while node is not None and node.op_type in _PASS and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None:
        return None
    if node.op_type == "Add" and len(node.inputs) == 2:
        a, b = node.inputs
        bias, out = (a, b) if is_constant(a) else (b, a)
        if is_constant(bias) and out is not None and not is_constant(out):
            inner = out.producer()
            if inner is not None and is_layer(inner) and len(inner.inputs) < 3:
                return StreamWriter(inner, bias, node)
        return None
    if is_layer(node):
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and not is_constant(c):
            return None
        return StreamWriter(node, c, node if c is not None else None)
    return None


def _writer_values(writer: StreamWriter, end: ir.Value) -> list[ir.Value]:
    """The values from the writer's output to ``end`` (the one added into the stream)."""
    values, v = [], writer.node.outputs[0]
    while True:
        values.append(v)
        if v is end:
            return values
        consumers = v.consumers()
        if not consumers:
            return values
        v = consumers[0].outputs[0]


def _scalar_other(node: ir.Node, value: ir.Value) -> bool:
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    return is_constant(other) and constant(other).size == 1


def _embedding(model: ir.Model, signature: LLMSignature) -> ir.Node:
    ids = next((v for v in model.graph.inputs if v.name == signature.input_ids), None)
    if ids is not None:
        for node in ids.consumers():
            if node.op_type == "Gather" and node.inputs[1] is ids and _table_or_none(node):
                return node
    raise NotRotatable("no embedding table (a Gather of a constant by input_ids) found")


def _table_or_none(gather: ir.Node) -> ir.TensorProtocol | None:
    try:
        return _table(gather)
    except NotRotatable:
        return None


def _table(gather: ir.Node) -> ir.TensorProtocol:
    """The embedding table ``[vocab, d]`` (materialised from a Transpose of a constant)."""
    data = gather.inputs[0]
    if gather.attributes.get_int("axis", 0) != 0 or data is None:
        raise NotRotatable(f"{gather.name} is not a row lookup")
    if is_constant(data) and len(constant(data).shape) == 2:
        return constant(data)
    producer = data.producer()
    if producer is not None and producer.op_type == "Transpose" and is_constant(producer.inputs[0]):
        table = constant(producer.inputs[0])
        dims = static_shape(table)
        return ir.Tensor(table.numpy().T, name=name_of(data)) if len(dims) == 2 else table
    raise NotRotatable(f"{gather.name} does not read a constant table")


def head_pairs(model: ir.Model) -> tuple[list[HeadPair], list[str]]:
    """The ``(v_proj, o_proj)`` pairs of every attention, and why any attention has none.

    Fused attention ops (``GroupQueryAttention``, ``MultiHeadAttention``) name their value
    input; a decomposed attention is found from the MatMul of its Softmax's output with the
    values, traced back to the projection that computes them (through the KV cache's Concat
    and grouped-query attention's Expand) and forward to the one projection that reads the
    attention's result.
    """
    pairs, reasons = [], []
    fused = attention_nodes(model)
    for attention in fused:
        node = attention.node
        source = node.inputs[0] if attention.packed else node.inputs[2]
        v_proj, bias = _projection_behind(source)
        o_proj = _projection_after(node.outputs[0])
        if v_proj is None or o_proj is None:
            reasons.append(f"{node.name}: no value or output projection with a constant weight")
            continue
        first, end = (0, layer_features(v_proj)[1])
        if attention.packed:
            _, first, end = attention.qkv_parts()[2]
        pairs.append(HeadPair(v_proj, (first, end), bias, o_proj, attention.head_size))
    if fused:
        return pairs, reasons
    for attention_values in _decomposed_value_inputs(model):
        v_proj, bias = _projection_behind(attention_values, through_concat=True)
        head_dim = attention_values.shape[-1] if attention_values.shape is not None else None
        if v_proj is None or not isinstance(head_dim, int):
            reasons.append(f"{name_of(attention_values)}: no value projection found")
            continue
        readers = _projections_reached(v_proj.outputs[0])
        if len(readers) != 1:
            reasons.append(
                f"{v_proj.name}: {len(readers)} projections read the values (expected one)"
            )
            continue
        features = layer_features(v_proj)[1]
        pairs.append(HeadPair(v_proj, (0, features), bias, readers[0], head_dim))
    if not pairs and not reasons:
        reasons.append("no attention (a fused attention op or Softmax then MatMul) found")
    return pairs, reasons


def _decomposed_value_inputs(model: ir.Model) -> list[ir.Value]:
    """The value input ``V`` (``[..., seq, head_dim]``) of every decomposed attention: the
    MatMul that reads a Softmax's output (through casts and the ``Where`` of NaN guards) as its
    first input."""
    found = []
    for node in model.graph:
        if node.op_type != "Softmax":
            continue
        frontier = [node.outputs[0]]
        for _ in range(_SOFTMAX_TO_MATMUL):
            matmul = next(
                (c for v in frontier for c in v.consumers() if _reads_probabilities(c, v)), None
            )
            if matmul is not None:
                assert matmul.inputs[1] is not None
                found.append(matmul.inputs[1])
                break
            frontier = [
                out
                for v in frontier
                for c in v.consumers()
                if c.op_type in (*_PASS, "Where")
                for out in c.outputs
            ]
    return found


def _reads_probabilities(node: ir.Node, value: ir.Value) -> bool:
    return node.op_type == "MatMul" and node.inputs[0] is value and node.inputs[1] is not None


def _projection_behind(
    value: ir.Value | None, through_concat: bool = False
) -> tuple[ir.Node | None, ir.Value | None]:
    """The MatMul/Gemm computing ``value`` through casts, reshapes, transposes (and, with
    ``through_concat``, a Concat with a model input: the KV cache), and a constant bias
    added to its output."""
    bias = None
    while value is not None:
        node = value.producer()
        if node is None:
            return None, None
        if is_layer(node):
            return node, bias
        if node.op_type in (*_PASS, "Reshape", "Transpose", "Unsqueeze", "Expand"):
            value = node.inputs[0]
        elif node.op_type == "Add" and bias is None and any(is_constant(v) for v in node.inputs):
            bias = next(v for v in node.inputs if is_constant(v))
            value = next((v for v in node.inputs if not is_constant(v)), None)
        elif through_concat and node.op_type == "Concat":
            computed = [v for v in node.inputs if v is not None and v.producer() is not None]
            value = computed[0] if len(computed) == 1 else None
        else:
            return None, None
    return None, None


def _projection_after(value: ir.Value) -> ir.Node | None:
    """The one MatMul/Gemm with a constant weight reading ``value`` (through reshapes)."""
    readers = list(value.consumers())
    if len(readers) != 1:
        return None
    node = readers[0]
    if is_layer(node, value):
        return node
    if node.op_type in (*_PASS, "Reshape"):
        return _projection_after(node.outputs[0])
    return None


def _projections_reached(value: ir.Value) -> list[ir.Node]:
    """The MatMul/Gemm layers with constant weights that ``value`` reaches without passing
    through one."""
    found, seen, todo = [], set(), [value]
    while todo:
        v = todo.pop()
        for node in v.consumers():
            if node in seen:
                continue
            seen.add(node)
            if is_layer(node) and node.inputs[0] is v:
                found.append(node)
            else:
                todo.extend(node.outputs)
    return found


def down_projections(model: ir.Model, exclude: set[ir.Node]) -> list[ir.Node]:
    """MatMul/Gemm layers with constant weights that read an MLP's inner activation (their
    input is computed by an activation or a gating ``Mul``), other than ``exclude`` (the
    attention output projections)."""
    found = []
    for node in model.graph:
        if node in exclude or not is_layer(node) or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        if producer is not None and producer.op_type in ACTIVATION_OPS:
            found.append(node)
    return found
