"""Cut an LLM graph into stages, one per target group, and build each stage as an ONNX model.

Stage ``i`` computes the input of group ``i``: every node it needs that depends on a target and
that no earlier stage computed, so each such node belongs to exactly one stage and runs once
per stream and window. Within a decoder block this is true-sequential: q/k/v, then o, then
gate/up, then down. Nodes after the last group input (final norm, ``lm_head`` unless it is a
target, ``present.*`` outputs) belong to no stage and never run during calibration.

Nodes that no target feeds (attention masks, rotary tables, the embedding lookup: *shared*
nodes, computed from the graph inputs alone) are recomputed in every stage that needs them
instead of being kept for every window between stages: they are cheap, and an attention mask
kept for every window would take ``4 W L^2`` bytes. So the values that cross stage boundaries
(``Stage.outputs``) all depend on a target, and differ between the streams. A stage made only
of shared nodes (the first layer's q/k/v input) runs once per window: both streams see it alike.

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
from .targets import ACT_QUANT_SOURCE, TargetGroup
from .values import constant, name_of

FED_CONSTANT_BYTES = 1 << 20


@dataclass
class Stage:
    """A slice of the graph, run as one ONNX Runtime session.

    Attributes:
        index: position in run order.
        nodes: the nodes, in graph order (its own and the shared ones it recomputes).
        shared: no node depends on a target: run once per window, both streams alike.
        group: the target group whose input this stage completes, if any.
        inputs: values read from outside the stage (graph inputs, earlier stages' outputs).
        constants: initializers the stage reads.
        outputs: values later stages read (they all depend on a target).
        observed: values computed here for the statistics or a static activation scale (the
            group's input and the value it quantizes, an activation quantizer's source).
        weights: target weights among ``constants`` (fed per stream).
        act_scales: static activation-scale initializers this stage's quantizer reads: fitted
            on the quantized stream's source values, observed by an earlier stage, before this
            stage runs.
        quant_only: only the quantized stream runs it (an activation quantizer: the float
            network reads the value before quantization).
        target_outputs: ``(target node, output value)`` of the targets computed here: both
            streams' outputs are compared to measure each layer's output error.
        recomputed: the nodes an earlier stage runs too, run again here so that the wide
            value they make is not kept for every window (``plan_stages(recompute_wide=True)``).
    """

    index: int
    nodes: list[ir.Node]
    shared: bool
    group: TargetGroup | None = None
    inputs: list[str] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    observed: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    act_scales: list[str] = field(default_factory=list)
    quant_only: bool = False
    target_outputs: list[tuple[str, str]] = field(default_factory=list)
    recomputed: set[ir.Node] = field(default_factory=set)

    @property
    def run_outputs(self) -> list[str]:
        """What a run computes: ``outputs``, ``observed`` and the measured target outputs."""
        names = [*self.outputs, *self.observed, *(v for _, v in self.target_outputs)]
        return list(dict.fromkeys(names))


def plan_stages(
    model: ir.Model, groups: list[TargetGroup], recompute_wide: bool = False
) -> list[Stage]:
    """Order ``groups`` by where their input is computed and cut the graph into stages.

    With ``recompute_wide``, a group input wider than what its stage reads from earlier stages
    (an MLP's intermediate-wide down_proj input, computed from the hidden-wide gate/up input)
    is not kept between stages: the one later stage that reads it computes it again from those
    narrower values (gate/up run twice per window; the values are the same).

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
    computed: set[ir.Node] = set()  # target-dependent nodes a stage has computed
    for group in sorted(groups, key=position):
        start = len(stages)
        for nodes, scales in _parts(group, values, computed, dependent):
            ordered = sorted(nodes, key=order.__getitem__)
            computed.update(n for n in ordered if n in dependent)
            _check_no_control_flow(ordered)
            shared = not any(n in dependent for n in ordered)
            stages.append(
                Stage(len(stages), ordered, shared, act_scales=scales, quant_only=bool(scales))
            )
        if len(stages) == start:  # the group reads a graph input directly
            stages.append(Stage(len(stages), [], shared=True))
        stages[-1].group = group
    tail = [n for n in model.graph if n.name in target_nodes and n not in computed]
    if tail:  # targets no later group input needs: run them once to measure their error
        nodes = _ancestors_of_nodes(tail, computed) | set(tail)
        stages.append(Stage(len(stages), sorted(nodes, key=order.__getitem__), shared=False))
    _wire(stages, weight_names, dependent)
    if recompute_wide and _recompute_wide_inputs(stages, values, order):
        for stage in stages:
            stage.inputs, stage.constants, stage.outputs = [], [], []
            stage.observed, stage.weights = [], []
        _wire(stages, weight_names, dependent)
    for stage in stages:
        stage.target_outputs = [
            (name_of(n), name_of(n.outputs[0]))
            for n in stage.nodes
            if n.name in target_nodes and n not in stage.recomputed
        ]
    return stages


def _recompute_wide_inputs(
    stages: list[Stage], values: dict[str, ir.Value], order: dict[ir.Node, int]
) -> bool:
    """Move the computation of each wide group input into the one later stage that reads it
    (see ``plan_stages``); returns whether any moved. Only for a weight-only group (no
    activation quantizer on its input) whose stage and reader are plain two-stream stages, and
    whose input is wider than the sum of the boundary values its stage reads."""
    moved = False
    for i, stage in enumerate(stages):
        group = stage.group
        if group is None or group.source is not None or stage.shared or stage.act_scales:
            continue
        readers = [later for later in stages[i + 1 :] if group.input in later.inputs]
        if len(readers) != 1 or readers[0].quant_only or readers[0].act_scales:
            continue
        boundary = [n for n in stage.inputs if values[n].producer() is not None]
        widths = [_features(values[n]) for n in boundary]
        if not boundary or any(w is None for w in widths):
            continue
        if sum(w for w in widths if w is not None) >= group.in_features:
            continue
        again = _ancestors(values[group.input], set()) & set(stage.nodes)
        reader = readers[0]
        reader.nodes = sorted(set(reader.nodes) | again, key=order.__getitem__)
        reader.recomputed |= again
        moved = True
    return moved


def _features(value: ir.Value) -> int | None:
    """The static size of a value's last axis, if known."""
    shape = value.shape
    if shape is None or len(shape) == 0 or not isinstance(shape[-1], int):
        return None
    return shape[-1]


def _parts(
    group: TargetGroup,
    values: dict[str, ir.Value],
    computed: set[ir.Node],
    dependent: set[ir.Node],
) -> list[tuple[set[ir.Node], list[str]]]:
    """The nodes the group input needs, as ``(nodes, static scales)`` parts in run order.

    A static activation quantizer gets a part of its own, after the nodes computing its source,
    so that its scale can be fitted on the source before it runs (the shared nodes the source
    needs are recomputed there).
    """
    needed = _ancestors(values[group.input], computed)
    if group.source is None:
        return [(needed, [])] if needed else []
    main = _ancestors(values[group.source], computed)
    quantizer = needed - main
    scales = sorted(
        {name_of(v) for n in quantizer for v in n.inputs if v is not None and ACT_SCALE in v.meta}
    )
    if not scales:
        return [(needed, [])] if needed else []
    return [(main, []), (quantizer | {n for n in main if n not in dependent}, scales)]


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


def _ancestors_of_nodes(nodes: list[ir.Node], computed: set[ir.Node]) -> set[ir.Node]:
    """Every node the inputs of ``nodes`` depend on, not counting those already ``computed``."""
    found: set[ir.Node] = set()
    for node in nodes:
        for v in node.inputs:
            if v is not None:
                found |= _ancestors(v, computed)
    return found


def _target_dependent(model: ir.Model, target_nodes: set[str]) -> set[ir.Node]:
    """Nodes whose result depends on a target's output, the targets and the activation
    quantizers included (a quantizer differs between the streams: the float one skips it)."""
    dependent: set[ir.Node] = _quantizer_nodes(model)
    for node in model.graph:  # graph order is topological
        if node.name in target_nodes or any(
            v is not None and v.producer() in dependent for v in node.inputs
        ):
            dependent.add(node)
    return dependent


def _quantizer_nodes(model: ir.Model) -> set[ir.Node]:
    """The nodes of every activation quantizer: from the value it quantizes (excluded) to its
    output (``ACT_QUANT_SOURCE`` on it)."""
    found: set[ir.Node] = set()
    for node in model.graph:
        for out in node.outputs:
            source = out.meta.get(ACT_QUANT_SOURCE)
            if source is None:
                continue
            stack = [node]
            while stack:
                n = stack.pop()
                if n in found:
                    continue
                found.add(n)
                stack.extend(
                    v.producer()  # type: ignore[misc]
                    for v in n.inputs
                    if v is not None and v.producer() is not None and v.name != source
                )
    return found


def _wire(stages: list[Stage], weight_names: set[str], dependent: set[ir.Node]) -> None:
    """Fill each stage's inputs, constants, weights, outputs and observed values.

    A stage that computes an activation quantizer's output read later also outputs the value
    it quantizes: the float stream reads that one instead."""
    sources = {
        st.group.input: st.group.source
        for st in stages
        if st.group is not None and st.group.source is not None
    }
    produced_in: dict[str, int] = {}
    for stage in stages:
        for node in stage.nodes:
            if node in dependent and node not in stage.recomputed:
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
                        producer = stages[produced_in[name]]
                        _add_output(producer, name)
                        source = sources.get(name)
                        if source is not None and source in _own_values(producer):
                            _add_output(producer, source)
        if stage.group is not None:
            for group_value in (stage.group.input, stage.group.source):
                if group_value is not None and group_value in own:
                    stage.observed.append(group_value)
        for later in stages[stage.index + 1 :]:
            for scale in later.act_scales:
                source = _scale_source(later, scale)
                if source in own and source not in stage.observed:
                    stage.observed.append(source)


def _scale_source(stage: Stage, scale: str) -> str:
    """The value a static activation scale of ``stage`` quantizes."""
    for node in stage.nodes:
        for v in node.inputs:
            if v is not None and v.name == scale:
                return v.meta[ACT_SCALE].source
    raise ValueError(f"no node of stage {stage.index} reads the scale {scale}")


def _own_values(stage: Stage) -> set[str]:
    return {name_of(v) for n in stage.nodes for v in n.outputs}


def _add_output(stage: Stage, name: str) -> None:
    if name not in stage.outputs:
        stage.outputs.append(name)


def last_uses(stages: list[Stage]) -> dict[str, int]:
    """For every value a stage reads from an earlier stage, the index of the last stage that
    reads it.

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
        for name in stage.inputs:
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


def graph_stage(model: ir.Model, outputs: list[str]) -> Stage:
    """The whole graph as one stage computing ``outputs``: ``stage_model`` then builds it with
    its large constants as graph inputs, fed at run time (a whole-model run that serializes no
    weight and lets ONNX Runtime copy or pre-pack none)."""
    nodes = list(model.graph)
    read = {name_of(v) for n in nodes for v in n.inputs if v is not None}
    return Stage(
        0,
        nodes,
        shared=False,
        inputs=[name_of(v) for v in model.graph.inputs if name_of(v) in read],
        constants=[n for n in model.graph.initializers if n in read],
        outputs=list(outputs),
    )


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
