"""Cut an LLM graph into stages, one per target group, and build each stage as an ONNX model.

Stage ``i`` is every node that the input of group ``i`` needs and no earlier stage computed, so
each node belongs to exactly one stage and the stages, run in order, compute every group input
once. Within a decoder block this is true-sequential: q/k/v, then o, then gate/up, then down.
Nodes after the last group input (final norm, ``lm_head`` unless it is a target, ``present.*``
outputs) belong to no stage and never run during calibration.

A stage's nodes are split in two: the *shared* part, which no target feeds (attention masks,
rotary tables, the embedding lookup), runs once per sample; the rest runs once per stream.

A stage model takes as graph inputs its boundary values, the graph inputs it reads, every target
weight it uses and every constant larger than ``FED_CONSTANT_BYTES`` (fed at run time, so that
the float and quantized streams can share one session and no protobuf nears 2 GB). Smaller
constants are embedded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from qronos_onnx.errors import QronosError

from .act_quant import ACT_SCALE
from .targets import TargetGroup
from .values import constant, name_of

FED_CONSTANT_BYTES = 1 << 20


@dataclass
class Stage:
    """A slice of the graph, run as one ONNX Runtime session.

    Attributes:
        index: position in run order.
        nodes: the nodes, in graph order.
        shared: no node depends on a target: run once and share the outputs between streams.
        group: the target group whose input this stage completes, if any.
        inputs: values read from outside the stage (graph inputs, earlier stages' outputs).
        constants: initializers the stage reads.
        outputs: values later stages read, plus the group input.
        weights: target weights among ``constants`` (fed per stream).
        act_scales: static activation-scale initializers this stage's quantizer reads: they are
            fitted on the quantized stream's source values before the stage runs.
        quant_only: only the quantized stream runs it (an activation quantizer: the float
            network reads the value before quantization).
        target_outputs: ``(target node, output value)`` of the targets computed here: both
            streams' outputs are compared to measure each layer's output error.
    """

    index: int
    nodes: list[ir.Node]
    shared: bool
    group: TargetGroup | None = None
    inputs: list[str] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    act_scales: list[str] = field(default_factory=list)
    quant_only: bool = False
    target_outputs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def run_outputs(self) -> list[str]:
        """What a run computes: ``outputs`` and the measured target outputs."""
        return [*self.outputs, *(v for _, v in self.target_outputs if v not in self.outputs)]


def plan_stages(model: ir.Model, groups: list[TargetGroup]) -> list[Stage]:
    """Order ``groups`` by where their input is computed and cut the graph into stages.

    Raises:
        QronosError: a control-flow node (If/Loop/Scan) lies on the path of a group input.
    """
    order = {node: i for i, node in enumerate(model.graph)}
    target_nodes = {t.node for g in groups for t in g.targets}
    weight_names = {t.weight for g in groups for t in g.targets}
    values = _values_by_name(model)
    dependent = _target_dependent(model, target_nodes)

    def position(group: TargetGroup) -> int:
        producer = values[group.input].producer()
        return -1 if producer is None else order[producer]

    stages: list[Stage] = []
    computed: set[ir.Node] = set()
    for group in sorted(groups, key=position):
        start = len(stages)
        for nodes, scales in _parts(group, values, computed):
            ordered = sorted(nodes, key=order.__getitem__)
            computed.update(ordered)
            _check_no_control_flow(ordered)
            if scales:
                stages.append(
                    Stage(len(stages), ordered, shared=False, act_scales=scales, quant_only=True)
                )
                continue
            shared = [n for n in ordered if n not in dependent]
            own = [n for n in ordered if n in dependent]
            if shared:
                stages.append(Stage(len(stages), shared, shared=True))
            if own:
                stages.append(Stage(len(stages), own, shared=False))
        if len(stages) == start:  # the group reads a graph input directly
            stages.append(Stage(len(stages), [], shared=True))
        stages[-1].group = group
    tail = [n for n in model.graph if n.name in target_nodes and n not in computed]
    if tail:  # targets no later group input needs: run them once to measure their error
        stages.append(Stage(len(stages), tail, shared=False))
    _wire(stages, weight_names)
    for stage in stages:
        stage.target_outputs = [
            (name_of(n), name_of(n.outputs[0])) for n in stage.nodes if n.name in target_nodes
        ]
    return stages


def _parts(
    group: TargetGroup, values: dict[str, ir.Value], computed: set[ir.Node]
) -> list[tuple[set[ir.Node], list[str]]]:
    """The nodes the group input needs, as ``(nodes, static scales)`` parts in run order.

    A static activation quantizer gets a part of its own, after the nodes computing its source,
    so that its scale can be fitted on the source before it runs.
    """
    needed = _ancestors(values[group.input], computed)
    if group.source is None:
        return [(needed, [])]
    main = _ancestors(values[group.source], computed)
    quantizer = needed - main
    scales = sorted(
        {name_of(v) for n in quantizer for v in n.inputs if v is not None and ACT_SCALE in v.meta}
    )
    return [(main, []), (quantizer, scales)] if scales else [(needed, [])]


def _check_no_control_flow(nodes: list[ir.Node]) -> None:
    for node in nodes:
        if any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            raise QronosError(
                f"control flow ({node.op_type} node {node.name!r}) on the path "
                "of a quantized layer is not supported"
            )


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {name_of(v): v for v in model.graph.inputs}
    values.update(model.graph.initializers)
    for node in model.graph:
        values.update((name_of(v), v) for v in node.outputs)
    return values


def _ancestors(value: ir.Value, computed: set[ir.Node]) -> set[ir.Node]:
    """Nodes ``value`` depends on, not counting those already ``computed``."""
    found: set[ir.Node] = set()
    stack = [value]
    while stack:
        node = stack.pop().producer()
        if node is None or node in found or node in computed:
            continue
        found.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    return found


def _target_dependent(model: ir.Model, target_nodes: set[str]) -> set[ir.Node]:
    """Nodes whose result depends on a target's output (the targets included)."""
    dependent: set[ir.Node] = set()
    for node in model.graph:  # graph order is topological
        if node.name in target_nodes or any(
            v is not None and v.producer() in dependent for v in node.inputs
        ):
            dependent.add(node)
    return dependent


def _wire(stages: list[Stage], weight_names: set[str]) -> None:
    """Fill each stage's inputs, constants, weights and outputs."""
    produced_in: dict[str, int] = {}
    for stage in stages:
        for node in stage.nodes:
            for out in node.outputs:
                produced_in[name_of(out)] = stage.index
    for stage in stages:
        own = {name_of(v) for n in stage.nodes for v in n.outputs}
        seen: set[str] = set()
        for node in stage.nodes:
            for v in node.inputs:
                if v is None or v.name in own or v.name in seen:
                    continue
                name = name_of(v)
                seen.add(name)
                if v.const_value is not None and not v.is_graph_input():
                    stage.constants.append(name)
                    if name in weight_names:
                        stage.weights.append(name)
                else:
                    stage.inputs.append(name)
                    if name in produced_in:
                        _add_output(stages[produced_in[name]], name)
        if stage.group is not None:
            for group_value in (stage.group.input, stage.group.source):
                if group_value is not None and group_value in own:
                    _add_output(stage, group_value)


def _add_output(stage: Stage, name: str) -> None:
    if name not in stage.outputs:
        stage.outputs.append(name)


def last_uses(stages: list[Stage]) -> dict[str, int]:
    """For every value a stage reads, the index of the last stage that reads it.

    The float stream reads an activation quantizer's source wherever the quantized stream reads
    its output, so a source lives as long as its quantized twin.
    """
    sources = {
        st.group.input: st.group.source
        for st in stages
        if st.group is not None and st.group.source is not None
    }
    last: dict[str, int] = {}
    for stage in stages:
        names = list(stage.inputs)
        if stage.group is not None:
            names.append(stage.group.input)
        for name in names:
            for n in (name, sources.get(name)):
                if n is not None:
                    last[n] = max(last.get(n, -1), stage.index)
    return last


def stage_model(model: ir.Model, stage: Stage, input_types: dict[str, np.dtype]) -> onnx.ModelProto:
    """The stage as a standalone ONNX model.

    Args:
        input_types: element type of every value in ``stage.inputs`` (from the arrays fed).
    Returns:
        A model whose graph inputs are ``stage.inputs``, the target weights and the fed
        constants, and whose outputs are ``stage.run_outputs`` (untyped: ONNX Runtime infers
        them).
    """
    graph_inputs = [
        onnx.helper.make_tensor_value_info(n, _onnx_type(input_types[n]), None)
        for n in stage.inputs
    ]
    fed = set(fed_constants(model, stage))
    embedded = []
    for name in stage.constants:
        tensor = constant(model.graph.initializers[name])
        if name in fed:
            graph_inputs.append(onnx.helper.make_tensor_value_info(name, int(tensor.dtype), None))
        else:
            # Materialised: a stage model is loaded from bytes, with no external data beside it.
            proto = ir.serde.serialize_tensor(ir.Tensor(tensor.numpy(), dtype=tensor.dtype))
            proto.name = name
            embedded.append(proto)
    nodes = [ir.serde.serialize_node(n) for n in stage.nodes]
    outputs = []
    for name in stage.run_outputs:
        info = onnx.ValueInfoProto()
        info.name = name
        outputs.append(info)
    graph = onnx.helper.make_graph(
        nodes, f"stage_{stage.index}", graph_inputs, outputs, initializer=embedded
    )
    opsets = [
        onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()
    ]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = model.ir_version
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto


def fed_constants(model: ir.Model, stage: Stage) -> list[str]:
    """Constants of ``stage`` that are fed at run time (not embedded), target weights first."""
    big = [
        n
        for n in stage.constants
        if n not in stage.weights
        and constant(model.graph.initializers[n]).nbytes > FED_CONSTANT_BYTES
    ]
    return [*stage.weights, *big]


def _onnx_type(dtype: np.dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
