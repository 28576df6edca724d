"""The rotations' self-check: the rotated float model must compute what the original computes.

``RotationCheckPass`` runs the original model and the rotated one through ONNX Runtime, one
after the other, on calibration tokens, and compares the logits. Each runs as one session whose
weights are fed from where they lie (the original's memory-mapped file, the rotated weights'
scratch file: ``passes/rotate.py``), so the check holds one session's activations and no copy
of either model. The logits must agree:
``||logits' - logits|| / ||logits||`` over every position must stay within ``TOLERANCE`` of the
model's float type. When it does not, the run stops with one line naming the first tensor
(in graph order) that diverges, found by comparing every layer output and residual value,
each through its known relation to the original (``RotationLog.relations``): a graph shape the
rotation passes misread shows up there.

The same runs measure what the rotations are for: the range of each quantized layer group's
input before and after (``max |x|``, the RMS, and the outlier ratio, the mean over tokens of
``max |x_t| / rms(x_t)``, which sets how coarse a per-token int4 grid is).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from qronos_onnx.calibration.session import make_session, run_session
from qronos_onnx.errors import QronosError
from qronos_onnx.files.scratch import release_pages
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.online_hadamard import hadamard_source
from qronos_onnx.ir.residual import is_layer
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.stages import fed_constants, graph_stage, stage_model
from qronos_onnx.ir.targets import find_targets, readable_name
from qronos_onnx.ir.values import constant, dtype_of, name_of

from .rotate import RotationLog

#: Largest accepted relative logits error, by the logits' element type. Measured (float32):
#: SmolLM2-135M 3e-6, the tiny test Llama 5e-7 (benchmarks/RESULTS.md, "Rotations"); float16
#: rounds every rotated weight and activation to 11 bits.
TOLERANCE = {ir.DataType.FLOAT: 1e-4, ir.DataType.FLOAT16: 2e-2, ir.DataType.BFLOAT16: 1e-1}
#: Tokens of the self-check (from the first calibration window), and of its diagnosis (which
#: keeps every layer output).
CHECK_TOKENS = 256
DIAGNOSIS_TOKENS = 16


@dataclass(frozen=True)
class InputRange:
    """A quantized layer group's input on the check tokens.

    Attributes:
        layer: the group's first layer (readable name).
        max: ``max |x|``.
        rms: ``sqrt(mean(x^2))``.
        outlier: mean over tokens of ``max_i |x_ti| / rms(x_t)`` (1 for a flat vector; up to
            ``sqrt(d)`` for one spike).
    """

    layer: str
    max: float
    rms: float
    outlier: float


@dataclass
class RotationCheck:
    """The self-check's measurements.

    Attributes:
        tokens: tokens compared.
        error: relative error of the rotated model's logits.
        tolerance: the bound it had to meet.
        before, after: each layer group's input range in the original and the rotated model.
    """

    tokens: int = 0
    error: float = 0.0
    tolerance: float = 0.0
    before: list[InputRange] = field(default_factory=list)
    after: list[InputRange] = field(default_factory=list)


@dataclass
class CheckResult(ir.passes.PassResult):
    """The self-check's measurements (``RotationCheck``); the model is not changed."""

    check: RotationCheck = field(default_factory=RotationCheck)


class RotationCheckPass(ir.passes.InPlacePass):
    """Compare the rotated model (the pass's input) with the original file on calibration
    tokens; refuse (``QronosError``) a model whose logits diverge; return the measurements.

    Args:
        original: the original model file.
        samples: calibration feeds (the first one's first ``CHECK_TOKENS`` tokens are used).
        log: what the rotations did (its relations name how each rotated value follows from
            the original, for the diagnosis).
        device: ONNX Runtime's device.

    Requires: calibration samples.
    Ensures: the logits agree within the tolerance (else the pass has raised).
    """

    def __init__(
        self,
        original: str | os.PathLike,
        samples: Sequence[dict],
        log: RotationLog,
        device: str = "auto",
    ):
        super().__init__()
        self.original, self.samples, self.log, self.device = Path(original), samples, log, device

    def requires(self, model: ir.Model) -> None:
        if not self.samples:
            raise ir.passes.PreconditionError("the rotation self-check needs calibration samples")

    def call(self, model: ir.Model) -> CheckResult:
        signature = detect_signature(model)
        feed = _first_tokens(self.samples, signature.input_ids, CHECK_TOKENS)
        mask = feed.get(signature.attention_mask) if signature.attention_mask else None
        original = load_model(self.original)
        groups = _group_inputs(model)
        logits = signature.logits
        before = _run(
            original, [logits, *(g[2] for g in groups)], feed, self.device, "the original model"
        )
        after = _run(
            model, [logits, *(g[1] for g in groups)], feed, self.device, "the rotated model"
        )
        tolerance = TOLERANCE.get(dtype_of(_output(model, logits)), 1e-4)
        error = _relative_error(after[0], before[0])
        check = RotationCheck(
            int(np.prod(feed[signature.input_ids].shape)),
            error,
            tolerance,
            [_range(g[0], x, mask) for g, x in zip(groups, before[1:], strict=True)],
            [_range(g[0], x, mask) for g, x in zip(groups, after[1:], strict=True)],
        )
        if not error <= tolerance:
            short = _first_tokens(self.samples, signature.input_ids, DIAGNOSIS_TOKENS)
            where = _first_divergence(original, model, short, self.log, tolerance, self.device)
            raise QronosError(
                f"the rotated model does not compute what the original does: logits differ by "
                f"{error:.2e} (relative; tolerance {tolerance:.0e}){where}. This graph shape is "
                "not supported by the rotations; give --rotate none"
            )
        return CheckResult(model, False, check)


def _first_tokens(samples: Sequence[dict], input_ids: str, tokens: int) -> dict:
    """The first calibration sample, cut to its first ``tokens`` positions (every feed whose
    second axis is the window's length)."""
    feed = samples[0]
    length = feed[input_ids].shape[1]
    if length <= tokens:
        return feed
    return {
        k: (v[:, :tokens] if np.ndim(v) == 2 and v.shape[1] == length else v)
        for k, v in feed.items()
    }


def _group_inputs(model: ir.Model) -> list[tuple[str, str, str]]:
    """``(layer, input name in the rotated model, input name in the original)`` of every layer
    group: the same name, except behind an online Hadamard (the original's input is the
    Hadamard's input)."""
    groups, _ = find_targets(model, include_lm_head=True)
    found = []
    for group in groups:
        node = model.graph.node(group.targets[0].node)
        rotated = node.inputs[0]
        assert rotated is not None
        found.append((readable_name(node), name_of(rotated), name_of(hadamard_source(rotated))))
    return found


def _output(model: ir.Model, name: str) -> ir.Value:
    return next(v for v in model.graph.outputs if v.name == name)


def _run(model: ir.Model, names: list[str], feed: dict, device: str, what: str) -> list[np.ndarray]:
    """``names`` computed by ``model`` in one session whose large constants are fed from
    where they are (the original's memory-mapped file, the rotated weights' scratch file):
    nothing is serialized or copied, and nothing outlives the run."""
    stage = graph_stage(model, names)
    proto = stage_model(model, stage, {n: np.asarray(feed[n]).dtype for n in stage.inputs})
    session = make_session(proto, device, what=what)
    fed = {n: constant(model.graph.initializers[n]).numpy() for n in fed_constants(model, stage)}
    outputs = run_session(session, names, {**{n: feed[n] for n in stage.inputs}, **fed}, what)
    for array in fed.values():  # read once: the weights' pages need not stay resident
        release_pages(array)
    return outputs


def _relative_error(x: np.ndarray, ref: np.ndarray) -> float:
    x64, ref64 = (
        torch.from_numpy(np.asarray(x, np.float64)),
        torch.from_numpy(np.asarray(ref, np.float64)),
    )
    return float(
        torch.linalg.vector_norm(x64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-30)
    )


def _range(layer: str, x: np.ndarray, mask: np.ndarray | None) -> InputRange:
    rows = torch.from_numpy(np.asarray(x, np.float64)).reshape(-1, x.shape[-1])
    if mask is not None and np.size(mask) * x.shape[-1] == rows.numel():
        rows = rows[torch.from_numpy(np.asarray(mask).reshape(-1) != 0)]
    rms_t = rows.pow(2).mean(dim=1).sqrt()
    live = rms_t > 0
    outlier = (
        (rows.abs().amax(dim=1)[live] / rms_t[live]).mean() if live.any() else torch.tensor(0.0)
    )
    return InputRange(
        layer, float(rows.abs().max()), float(rows.pow(2).mean().sqrt()), float(outlier)
    )


def _first_divergence(
    original: ir.Model,
    rotated: ir.Model,
    feed: dict,
    log: RotationLog,
    tolerance: float,
    device: str,
) -> str:
    """``"; first diverging tensor: ..."`` naming the first layer output or rotated value (in
    graph order) whose rotated value is not its relation of the original; ``""`` if none."""
    names = [
        name_of(v)
        for node in rotated.graph
        for v in node.outputs
        if (is_layer(node) and v is node.outputs[0]) or name_of(v) in log.relations
    ]
    in_original = {v.name for n in original.graph for v in n.outputs}
    names = [n for n in names if n in in_original]
    before = _run(original, names, feed, device, "the original model")
    after = _run(rotated, names, feed, device, "the rotated model")
    for name, b, a in zip(names, before, after, strict=True):
        relation = log.relations.get(name)
        expected = relation(torch.from_numpy(np.asarray(b, np.float64))) if relation else b
        error = _relative_error(a, np.asarray(expected))
        if error > tolerance:
            producer = next(n for n in rotated.graph if name in {v.name for v in n.outputs})
            return (
                f"; first diverging tensor: {name} (node {readable_name(producer)}, relative error "
                f"{error:.2e})"
            )
    return ""
