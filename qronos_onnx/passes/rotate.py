"""Incoherence processing as graph passes: fold the RMSNorm scales, then rotate (docs/rotations.md).

Each pass leaves the float network's function unchanged (up to rounding); ``RotationCheckPass``
(``passes/rotation_check.py``) measures that on calibration tokens. In the order they run:

``FoldNormScalesPass``
    Rewrites decomposed RMSNorms into ``SimplifiedLayerNormalization`` and folds every norm's
    scale ``gamma`` into the layers that read it (``W -> W diag(gamma)``), leaving scale 1.
``RotateResidualPass`` (R1)
    A random Hadamard ``Q`` on the residual stream: the embedding table's rows (``E Q``), the
    readers' inputs (``W -> W Q``) and the writers' outputs (``W -> Q^T W``, ``b -> b Q``).
``RotateHeadsPass`` (R2)
    A Hadamard ``H`` per attention head on the value projection's outputs (``Q^T``-side) and
    the output projection's inputs: ``softmax(.) V H`` per head, undone in ``o_proj``.
``OnlineHadamardPass`` (R4)
    A Hadamard ``M`` on the input of every MLP down projection: nodes computing ``x M``
    (``ir/online_hadamard.py``) and ``W -> W M`` in the layer, so that an activation quantizer
    in front of it sees the rotated (outlier-free) activation.

Weights are ``W`` ``[out, in]`` here (``qronos_onnx/weights.py``), rotations act on rows
(``quant/hadamard.py``). The matrices come from a rotation kind's generator
(``registry.ROTATIONS``: ``hadamard`` today), handed to the passes. A rotation that does not
apply is skipped with a ``RotationWarning`` that says why; the others still run. Each pass
returns a ``RotationResult`` (what it did, and how each rotated value relates to the original
one, for the self-check's diagnosis) and keeps no state of its own; what a rotation changed is
recorded on the model (``model.meta[ROTATED]``) for its ``ensures``. ``RotationLog`` gathers
the results for the report.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import torch

from qronos_onnx.errors import QronosError, RotationWarning
from qronos_onnx.ir.norms import find_norms, fuse_decomposed_norms, layer_norms, scale_vector
from qronos_onnx.ir.online_hadamard import insert_online_hadamard, is_online_hadamard
from qronos_onnx.ir.residual import (
    HeadPair,
    NotRotatable,
    ResidualStream,
    down_projections,
    head_pairs,
    is_layer,
    layer_features,
    residual_stream,
)
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.targets import TIED_TABLE, tied_lm_head, untie_lm_head
from qronos_onnx.ir.values import constant, dtype_of, name_of, shared_initializer, static_shape
from qronos_onnx.passes.chain import run_passes
from qronos_onnx.quant.hadamard import Rotation, hadamard_orders, random_hadamard
from qronos_onnx.registry import ROTATION_SITES, rotation_generator
from qronos_onnx.weights import (
    to_torch,
    transform_constant,
    transform_layer,
    write_constant,
)

#: The largest Kronecker factor of an online Hadamard (a dense ``[k, k]`` MatMul per factor).
MAX_ONLINE_FACTOR = 256

#: ``expected(original value) -> rotated value``, for values the rotations change.
Relation = Callable[[torch.Tensor], torch.Tensor]
#: ``generator(n, seed) -> Rotation``: a rotation kind (``registry.ROTATIONS``); ``seed=None``
#: asks for a matrix without random signs (an online rotation).
Generator = Callable[[int, int | None], Rotation]
#: ``model.meta`` key: what each rotation changed (``{"R1": readers, "R2": [v_proj names],
#: "R4": [layer names]}``), for the passes' ``ensures``.
ROTATED = "qronos.rotated"


@dataclass
class AppliedRotation:
    """One rotation as the report lists it.

    Attributes:
        name: ``R1``, ``R2`` or ``R4``.
        rotation: ``Rotation.describe()`` of the matrix (all layers of R2/R4 share it per size).
        size: its order.
        tensors: how many weight tensors it changed (and online Hadamards it inserted, R4).
        detail: one line on where it went.
    """

    name: str
    rotation: str
    size: int
    tensors: int
    detail: str

    @classmethod
    def of(
        cls, name: str, rotations: dict[int, Rotation], tensors: int, detail: str
    ) -> AppliedRotation:
        """A rotation applied with one matrix per size (``rotations``: order -> rotation)."""
        sizes = sorted(rotations)
        description = "; ".join(rotations[k].describe() for k in sizes)
        return cls(name, description, sizes[0], tensors, detail)


@dataclass
class RotationLog:
    """What the rotation passes did.

    Attributes:
        applied: the rotations applied.
        skipped: ``(name, reason)`` of the rotations that did not apply.
        folded_norms: norms whose scale was folded into their readers.
        added_bytes: the size the model grew by (an untied embedding, online Hadamard factors).
        relations: rotated value name -> how it follows from the original value.
    """

    applied: list[AppliedRotation] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    folded_norms: int = 0
    added_bytes: int = 0
    relations: dict[str, Relation] = field(default_factory=dict)

    def add(self, result: RotationResult) -> None:
        """Gather one pass's result."""
        self.applied.extend(result.applied)
        self.skipped.extend(result.skipped)
        self.folded_norms += result.folded_norms
        self.added_bytes += result.added_bytes
        self.relations.update(result.relations)


@dataclass
class RotationResult(ir.passes.PassResult):
    """What one rotation pass did (the fields of ``RotationLog``, for this pass)."""

    applied: list[AppliedRotation] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    folded_norms: int = 0
    added_bytes: int = 0
    relations: dict[str, Relation] = field(default_factory=dict)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))
        warnings.warn(f"rotation {name} skipped: {reason}", RotationWarning, stacklevel=3)


def _record(model: ir.Model, site: str, what: object) -> None:
    model.meta.setdefault(ROTATED, {})[site] = what


def _recorded(model: ir.Model, site: str) -> object:
    return model.meta.get(ROTATED, {}).get(site)


def refuse_layer_norms(model: ir.Model) -> None:
    """A ``QronosError`` for a model with LayerNorms (checked before calibration data is read)."""
    found = layer_norms(model)
    if found:
        raise QronosError(
            f"{found[0].name} is a LayerNorm (mean subtraction): rotations need RMSNorm "
            "models; give --rotate none"
        )


def _model_bytes(model: ir.Model) -> int:
    return sum(constant(v).nbytes for v in model.graph.initializers.values() if v.const_value)


class FoldNormScalesPass(ir.passes.InPlacePass):
    """Bring every RMSNorm to ``SimplifiedLayerNormalization`` form and, for R1, fold its scale
    into the layers that read it and give a tied lm_head its own weight (the embedding will be
    rotated apart from it).

    The scales are folded only when R1 will rotate the residual stream (``for_r1`` and a
    stream R1 can rotate): it needs them out of the way, and nothing else does. Folded without
    a rotation after them, they would only move from the activations into the weights, and a
    norm that damps an outlier channel would hand that channel to the activation quantizer
    (Gemma 3's pre-norms scale its massive residual channel by 0: folded, ``--w4a4`` on
    Gemma-3-270M went from perplexity 432 to 480,831; benchmarks/RESULTS.md).

    Args:
        for_r1: R1 is asked for.

    Requires: a decoder LLM graph without LayerNorms (mean subtraction does not commute with
    a rotation: refused with a ``QronosError``).
    Ensures: when folded, every norm whose readers are all layers with constant weights has
    scale 1.
    """

    def __init__(self, for_r1: bool = True):
        super().__init__()
        self.for_r1 = for_r1

    def requires(self, model: ir.Model) -> None:
        detect_signature(model)
        refuse_layer_norms(model)

    def call(self, model: ir.Model) -> RotationResult:
        result = RotationResult(model, True)
        before = _model_bytes(model)
        fuse_decomposed_norms(model)
        if not self.for_r1 or not _rotatable(model):
            return result
        untie_lm_head(model)
        for node in model.graph:  # folding and rotating make the two differ
            node.meta.pop(TIED_TABLE, None)
        _record(model, FOLDED, True)
        for norm in find_norms(model):
            readers = list(norm.output.consumers())
            gamma = scale_vector(norm.scale)
            if gamma is None or not readers or not all(is_layer(n, norm.output) for n in readers):
                continue
            g = torch.from_numpy(np.broadcast_to(gamma, (layer_features(readers[0])[0],)).copy())
            for node in readers:
                transform_layer(model, node, g.mul)  # W diag(g)
            ones = shared_initializer(
                model, f"qronos.ones.{g.numel()}", np.ones(g.numel()), _scale_dtype(norm.scale)
            )
            norm.node.replace_input_with(2 if norm.skip else 1, ones)
            result.folded_norms += 1
        result.added_bytes = _model_bytes(model) - before
        return result

    def ensures(self, model: ir.Model) -> None:
        if not _recorded(model, FOLDED):
            return
        for norm in find_norms(model):
            if all(is_layer(n, norm.output) for n in norm.output.consumers()):
                gamma = scale_vector(norm.scale)
                if gamma is None or not np.all(gamma == 1):
                    raise ir.passes.PostconditionError(f"{norm.node.name} keeps its scale")


#: ``model.meta[ROTATED]`` key: the norm scales were folded (for R1).
FOLDED = "folded norms"


def _rotatable(model: ir.Model) -> bool:
    """Whether the residual stream has the structure R1 rotates (``ir/residual.py``), once a
    tied lm_head has its own weight."""
    tied = tied_lm_head(model)
    try:
        residual_stream(model, detect_signature(model), None if tied is None else tied[0])
    except NotRotatable:
        return False
    return True


def _scale_dtype(scale: ir.Value) -> ir.DataType:
    """The element type of a norm's scale (of its computation, for Gemma's ``1 + w``)."""
    return dtype_of(scale) if scale.dtype is not None else constant(scale).dtype


class RotateResidualPass(ir.passes.InPlacePass):
    """R1: a random rotation on the residual stream (see the module docstring).

    Args:
        generator: the rotation kind's matrix generator.
        seed: the seed of its random signs.

    Requires: norm scales folded (``FoldNormScalesPass``) where the stream is rotatable.
    Ensures: when rotated, the residual stream is still one, with the same readers.
    """

    def __init__(self, generator: Generator = random_hadamard, seed: int = 0):
        super().__init__()
        self.generator, self.seed = generator, seed

    def requires(self, model: ir.Model) -> None:
        if not _rotatable(model):
            return  # R1 says why, and skips
        for norm in find_norms(model):
            gamma = scale_vector(norm.scale)
            readers = norm.output.consumers()
            folded = gamma is not None and bool(np.all(gamma == 1))
            if readers and all(is_layer(n, norm.output) for n in readers) and not folded:
                raise ir.passes.PreconditionError(
                    f"{norm.node.name} has a scale: run FoldNormScalesPass first"
                )

    def call(self, model: ir.Model) -> RotationResult:
        result = RotationResult(model, False)
        try:
            stream = residual_stream(model, detect_signature(model))
            _check_folded(stream)
        except NotRotatable as err:
            result.skip("R1", str(err))
            return result
        before = _model_bytes(model)
        q = self.generator(stream.d_model, self.seed)
        _untranspose_table(model, stream)
        transform_constant(model, stream.embedding, 0, q.apply)  # copy-on-write: its own table
        for node in stream.readers:
            transform_layer(model, node, q.apply)
        for writer in stream.writers:
            transform_layer(model, writer.node, q.apply, along="out")
            if writer.bias is not None and writer.bias_node is not None:
                index = list(writer.bias_node.inputs).index(writer.bias)
                bias = to_torch(constant(writer.bias)).double()
                write_constant(model, writer.bias_node, index, _apply_last(q, bias))
        for norm in stream.norms:
            if norm.bias is not None:
                bias = to_torch(constant(norm.bias)).double()
                write_constant(model, norm.node, 3, q.apply(bias))
        rotate = _relation(q)
        for value in [*stream.values, *(w.node.outputs[0] for w in stream.writers)]:
            result.relations[name_of(value)] = rotate
        result.added_bytes = _model_bytes(model) - before
        tensors = 1 + len(stream.readers) + len(stream.writers)
        _record(model, "R1", len(stream.readers))
        result.modified = True
        result.applied.append(
            AppliedRotation(
                "R1",
                q.describe(),
                q.n,
                tensors,
                f"residual stream: embedding, {len(stream.readers)} readers (q/k/v, gate/up, "
                f"lm_head), {len(stream.writers)} writers (o_proj, down_proj)",
            )
        )
        return result

    def ensures(self, model: ir.Model) -> None:
        readers = _recorded(model, "R1")
        if readers is None:
            return
        try:
            after = residual_stream(model, detect_signature(model))
        except NotRotatable as err:
            raise ir.passes.PostconditionError(f"the residual stream is broken: {err}") from err
        if len(after.readers) != readers:
            raise ir.passes.PostconditionError("the residual stream lost readers")


def _check_folded(stream: ResidualStream) -> None:
    for norm in stream.norms:
        gamma = scale_vector(norm.scale)
        if gamma is None or not np.all(gamma == 1):
            raise NotRotatable(f"the scale of {norm.node.name} could not be folded")


def _untranspose_table(model: ir.Model, stream: ResidualStream) -> None:
    """Give the embedding its table as an initializer when it reads it through a Transpose
    (ONNX Runtime GenAI's tied lm_head)."""
    gather = stream.embedding
    data = gather.inputs[0]
    assert data is not None
    producer = data.producer()
    if producer is not None:  # a Transpose of the lm_head's weight
        source = constant(producer.inputs[0])
        write_constant(model, gather, 0, to_torch(source).T.contiguous(), source.dtype)
    if producer is not None and not producer.outputs[0].uses():
        source_value = producer.inputs[0]
        model.graph.remove(producer, safe=True)
        if source_value is not None and not source_value.uses() and source_value.name:
            model.graph.initializers.pop(source_value.name, None)


def _apply_last(q: Rotation, t: torch.Tensor) -> torch.Tensor:
    """``t Q`` for a bias of any rank whose last axis has ``Q``'s order."""
    return q.apply(t.reshape(-1, q.n)).reshape(t.shape)


def _per_head(h: Rotation, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[k, heads * h.n]`` with ``h`` applied to each head's slice of the last axis."""
    return h.apply(x.reshape(x.shape[0], -1, h.n)).reshape(x.shape)


def _relation(q: Rotation) -> Relation:
    return lambda x: q.apply(x.double())


class RotateHeadsPass(ir.passes.InPlacePass):
    """R2: a rotation per attention head between the value and output projections.

    Args:
        generator: the rotation kind's matrix generator.
        seed: the seed of its random signs (R2 draws with ``seed + 1``, modulo 2^64).

    Requires: a decoder LLM graph.
    Ensures: every rotated pair's head size divides both projections' value features.
    """

    def __init__(self, generator: Generator = random_hadamard, seed: int = 0):
        super().__init__()
        self.generator, self.seed = generator, seed

    def requires(self, model: ir.Model) -> None:
        detect_signature(model)

    def call(self, model: ir.Model) -> RotationResult:
        result = RotationResult(model, False)
        pairs, reasons = head_pairs(model)
        for reason in reasons:
            result.skip("R2", reason)
        rotations: dict[int, Rotation] = {}
        rotated: list[HeadPair] = []
        for pair in pairs:
            first, end = pair.v_features
            hd = pair.head_dim
            if (end - first) % hd or layer_features(pair.o_proj)[0] % hd:
                result.skip("R2", f"{pair.v_proj.name}: features not a multiple of {hd}")
                continue
            h = rotations.setdefault(hd, self.generator(hd, (self.seed + 1) % (1 << 64)))
            relation = _head_relation(h, first, end)
            transform_layer(model, pair.v_proj, relation, along="out")
            if pair.v_bias is not None:
                self._rotate_bias(model, pair, h)
            transform_layer(model, pair.o_proj, functools.partial(_per_head, h))
            result.relations[name_of(pair.v_proj.outputs[0])] = relation
            rotated.append(pair)
        if rotated:
            sizes = ", ".join(map(str, sorted(rotations)))
            result.applied.append(
                AppliedRotation.of(
                    "R2",
                    rotations,
                    2 * len(rotated),
                    f"per head (head size {sizes}): {len(rotated)} value/output projection pairs",
                )
            )
            _record(model, "R2", [(p.o_proj.name, p.head_dim) for p in rotated])
            result.modified = True
        return result

    @staticmethod
    def _rotate_bias(model: ir.Model, pair: HeadPair, h: Rotation) -> None:
        bias_value = pair.v_bias
        assert bias_value is not None
        node = next(n for n in bias_value.consumers() if n.op_type == "Add")
        first, end = pair.v_features
        b = to_torch(constant(bias_value)).double().reshape(-1)
        b[first:end] = h.apply(b[first:end].reshape(-1, h.n)).reshape(-1)
        index = list(node.inputs).index(bias_value)
        write_constant(model, node, index, b.reshape(static_shape(constant(bias_value))))

    def ensures(self, model: ir.Model) -> None:
        rotated = _recorded(model, "R2") or []
        for name, head_dim in rotated:  # type: ignore[attr-defined]
            o_proj = next((n for n in model.graph if n.name == name), None)
            if o_proj is None or layer_features(o_proj)[0] % head_dim:
                raise ir.passes.PostconditionError(f"{name}: heads do not tile")


def _head_relation(h: Rotation, first: int, end: int) -> Relation:
    def rotate(x: torch.Tensor) -> torch.Tensor:
        y = x.double().clone()
        part = y[..., first:end]
        y[..., first:end] = h.apply(part.reshape(*part.shape[:-1], -1, h.n)).reshape(part.shape)
        return y

    return rotate


class OnlineHadamardPass(ir.passes.InPlacePass):
    """R4: a rotation on the input of every MLP down projection, as online nodes in front of it
    (through its Kronecker factors) and its inverse fused into its weight.

    Args:
        generator: the rotation kind's matrix generator (asked for matrices without random
            signs; a matrix without Kronecker factors cannot run online and is skipped).

    Requires: a decoder LLM graph.
    Ensures: every rotated layer reads an online rotation's output.
    """

    def __init__(self, generator: Generator = random_hadamard):
        super().__init__()
        self.generator = generator

    def requires(self, model: ir.Model) -> None:
        detect_signature(model)

    def call(self, model: ir.Model) -> RotationResult:
        result = RotationResult(model, False)
        before = _model_bytes(model)
        attention_outputs = {p.o_proj for p in head_pairs(model)[0]}
        layers = [
            n for n in down_projections(model, attention_outputs) if not _reads_online_hadamard(n)
        ]
        if not layers:
            result.skip("R4", "no MLP down projection (a layer reading an activation) found")
        rotations: dict[int, Rotation] = {}
        rotated: list[ir.Node] = []
        for node in layers:
            n = layer_features(node)[0]
            m = rotations.get(n) or (self.generator(n, None) if online_orders(n) else None)
            if m is None or not m.factors or len(m.factors) > 2:
                result.skip(
                    "R4",
                    f"{node.name}: {n} inputs have no Hadamard factorisation into at most two "
                    f"factors of order <= {MAX_ONLINE_FACTOR}",
                )
                continue
            rotations[n] = m
            transform_layer(model, node, m.apply)
            x = node.inputs[0]
            assert x is not None
            factors = [f.numpy() for f in m.factors]
            insert_online_hadamard(model, node, factors, dtype_of(x))
            rotated.append(node)
        if rotated:
            sizes = ", ".join(map(str, sorted(rotations)))
            result.applied.append(
                AppliedRotation.of(
                    "R4",
                    rotations,
                    len(rotated),
                    f"online before {len(rotated)} down projections (inputs {sizes})",
                )
            )
            _record(model, "R4", [n.name for n in rotated])
            result.modified = True
        result.added_bytes = _model_bytes(model) - before
        return result

    def ensures(self, model: ir.Model) -> None:
        for name in _recorded(model, "R4") or []:  # type: ignore[attr-defined]
            node = next((n for n in model.graph if n.name == name), None)
            if node is None or not _reads_online_hadamard(node):
                raise ir.passes.PostconditionError(f"{name} lost its online Hadamard")


def online_orders(n: int) -> tuple[int, ...] | None:
    """The Kronecker factors of an online Hadamard of order ``n`` (at most two, each of order
    at most ``MAX_ONLINE_FACTOR``), or ``None``."""
    orders = hadamard_orders(n, 2)
    return orders if orders is not None and max(orders) <= MAX_ONLINE_FACTOR else None


def _reads_online_hadamard(node: ir.Node) -> bool:
    x = node.inputs[0]
    producer = None if x is None else x.producer()
    return producer is not None and is_online_hadamard(producer)


def rotation_plan(model: ir.Model) -> list[tuple[str, str]]:
    """``(rotation, what it would do or why it does not apply)`` for R1, R2 and R4, as
    ``qronos-onnx inspect`` shows them. Folds the norm scales of ``model`` (in memory) to see
    the residual stream as R1 would."""
    try:
        refuse_layer_norms(model)
    except QronosError as err:
        return [(name, f"no: {err}") for name in ("R1", "R2", "R4")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RotationWarning)
        FoldNormScalesPass()(model)
    plan = []
    try:
        stream = residual_stream(model, detect_signature(model))
        _check_folded(stream)
        q = random_hadamard(stream.d_model).describe()
        counts = f"{len(stream.readers)} readers, {len(stream.writers)} writers"
        plan.append(("R1", f"yes: {q} on the residual stream ({counts})"))
    except NotRotatable as err:
        plan.append(("R1", f"no: {err}"))
    pairs, reasons = head_pairs(model)
    sizes = sorted({p.head_dim for p in pairs})
    r2 = f"yes: {len(pairs)} value/output pairs, head size {', '.join(map(str, sizes))}"
    plan.append(("R2", r2 if pairs else f"no: {'; '.join(reasons)}"))
    downs = down_projections(model, {p.o_proj for p in pairs})
    widths = sorted({layer_features(n)[0] for n in downs})
    factors = {n: online_orders(n) for n in widths}
    online = [f"{n} = {' x '.join(map(str, f))}" for n, f in factors.items() if f]
    if online:
        plan.append(
            ("R4", f"yes: online before {len(downs)} down projections ({', '.join(online)})")
        )
    else:
        why = "no MLP down projection found" if not downs else f"inputs {widths} do not factor"
        plan.append(("R4", f"no: {why}"))
    return plan


def rotation_passes(
    kind: str = "hadamard", sites: Sequence[str] = ROTATION_SITES, seed: int = 0
) -> list[ir.passes.PassBase]:
    """Fold the norms, then the rotations of ``sites`` (``R1``, ``R2``, ``R4``; each skipped,
    with a warning, where it does not apply) with matrices of the rotation ``kind``; then drop
    the initializers they left unused (the folded norm scales, copied weights)."""
    generator = rotation_generator(kind)
    at_site: dict[str, ir.passes.PassBase] = {
        "R1": RotateResidualPass(generator, seed),
        "R2": RotateHeadsPass(generator, seed),
        "R4": OnlineHadamardPass(generator),
    }
    return [
        FoldNormScalesPass(for_r1="R1" in sites),
        *(at_site[site] for site in ROTATION_SITES if site in sites),
        ir.passes.common.RemoveUnusedNodesPass(),
    ]


def apply_rotations(
    model: ir.Model,
    kind: str = "hadamard",
    sites: Sequence[str] = ROTATION_SITES,
    seed: int = 0,
) -> RotationLog:
    """Run ``rotation_passes`` on ``model`` (in place) and gather what they did."""
    log = RotationLog()
    for result in run_passes(model, rotation_passes(kind, sites, seed)):
        if isinstance(result, RotationResult):
            log.add(result)
    return log
