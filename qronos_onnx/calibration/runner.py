"""The two-stream calibration engine: stage by stage through ONNX Runtime.

For every calibration sample, each stage runs once per stream:

- the *float* stream runs the stage with the original weights on float inputs, and yields
  ``X``, the group input as the float network computes it;
- the *quant* stream runs it with the weights already solved (and activation quantizers, when
  the graph has them) on quantized-stream inputs, and yields ``X~``.

Stages that no target feeds run once and are shared. ``H`` and ``G`` of the group the stage
completes are accumulated from ``X`` and ``X~``, the group is solved, and its solved weights
are fed to the quant stream from then on. The whole run costs about two forward passes of the
calibration set plus the solves: no node runs more than once per stream and sample.

``reference="stage"`` takes ``X`` instead from the float stage applied to the quant stream's
inputs (the block mode of the reference implementation); the float stream is then not kept.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np
import onnx_ir as ir
import torch
from tqdm.auto import tqdm

from qronos_onnx.errors import QronosError
from qronos_onnx.ir.act_quant import ACT_SCALE, fit_static_scale
from qronos_onnx.ir.stages import Stage, fed_constants, last_uses, stage_model
from qronos_onnx.ir.targets import TargetGroup
from qronos_onnx.ir.values import constant

from .session import make_session, run_session
from .stats import GroupStats, token_rows

Reference = Literal["network", "stage"]

#: ``solve(group, H, G) -> {weight name: solved weight in the model's layout}``.
SolveFn = Callable[[TargetGroup, torch.Tensor, torch.Tensor], dict[str, np.ndarray]]


@dataclass
class CalibrationOptions:
    """How the engine runs.

    Attributes:
        reference: ``"network"`` (X from the float network) or ``"stage"`` (X from the float
            stage on the quantized stream's inputs).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``: ONNX Runtime's provider and torch's device
            for the statistics.
        progress: show a progress bar.
        optimize_graph: let ONNX Runtime fuse nodes (off for node-level profiling).
        profile: record ONNX Runtime's node executions (``CalibrationRun.node_runs``).
    """

    reference: Reference = "network"
    device: str = "auto"
    progress: bool = True
    optimize_graph: bool = True
    profile: bool = False

    def __post_init__(self) -> None:
        if self.reference not in ("network", "stage"):
            raise QronosError(f"reference must be 'network' or 'stage', got {self.reference!r}")


@dataclass
class CalibrationRun:
    """What a calibration run did.

    Attributes:
        stages: number of stages.
        session_runs: ONNX Runtime ``run`` calls.
        seconds: wall time of the stage runs, of the statistics and of the solves.
        providers: execution providers actually used.
        node_runs: with ``profile``, how many times each graph node ran.
        output_error: per target node, ``(||y||^2 / n, ||y - y~||^2 / n)`` over the ``n``
            calibration tokens that are not padding (the tokens the statistics count), with
            ``y`` its float-side and ``y~`` its quantized-side output.
    """

    stages: int = 0
    session_runs: int = 0
    # A Counter (parts not yet timed read 0) of float seconds; typeshed's Counter counts ints.
    seconds: dict[str, float] = field(default_factory=lambda: cast("dict[str, float]", Counter()))
    providers: list[str] = field(default_factory=list)
    node_runs: Counter = field(default_factory=Counter)
    output_error: dict[str, tuple[float, float]] = field(default_factory=dict)


def _square_sum(a: np.ndarray) -> float:
    """``sum(a^2)`` accumulated in float64, without a float64 copy of ``a``."""
    flat = a.reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


_STREAM = {"float": "float stream", "quant": "quantized stream", "shared": "both streams"}


def _label(stage: Stage) -> str:
    """The stage's first target, or its index when it completes no group."""
    return stage.group.targets[0].name if stage.group else f"stage {stage.index}"


def torch_device(device: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QronosError("device cuda: torch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise QronosError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


class TwoStreamCalibrator:
    """Runs the stages of a model over calibration samples in two streams and solves groups.

    Args:
        model: the model (its target weights are read, never changed here).
        stages: from ``plan_stages``.
        samples: full-graph feed dicts, one per batch.
        options: see ``CalibrationOptions``.
    """

    def __init__(
        self,
        model: ir.Model,
        stages: Sequence[Stage],
        samples: Sequence[dict],
        options: CalibrationOptions | None = None,
    ):
        if not samples:
            raise QronosError("no calibration samples")
        self.model = model
        self.stages = list(stages)
        self.samples = list(samples)
        self.options = options or CalibrationOptions()
        self.device = torch_device(self.options.device)
        self._values: dict[str, dict[str, list]] = {"float": {}, "quant": {}, "shared": {}}
        self._quant_weights: dict[str, np.ndarray] = {}
        self._last_use = last_uses(self.stages)
        self._sources = {
            s.group.input: s.group.source
            for s in self.stages
            if s.group is not None and s.group.source is not None
        }
        self.run_info = CalibrationRun(stages=len(self.stages))

    # -- value store -------------------------------------------------------------------

    def _lookup(self, side: str, name: str, s: int):
        """Sample ``s`` of value ``name`` as ``side`` (float / quant) sees it."""
        feed = self.samples[s]
        if name in feed:
            return feed[name]
        if side == "float" and name in self._sources:
            name = self._sources[name]  # the float network skips activation quantizers
        store = self._values[
            "float" if side == "float" and self.options.reference == "network" else "quant"
        ]
        if name in store:
            return store[name][s]
        return self._values["shared"][name][s]

    def _store(self, where: str, names: Sequence[str], arrays: Sequence, s: int) -> None:
        for name, array in zip(names, arrays, strict=False):
            self._values[where].setdefault(name, [None] * len(self.samples))[s] = array

    def _free(self, stage: Stage) -> None:
        for name in [n for n, last in self._last_use.items() if last == stage.index]:
            for store in self._values.values():
                store.pop(name, None)
        for name in stage.weights:
            self._quant_weights.pop(name, None)

    # -- running -----------------------------------------------------------------------

    def run(self, solve: SolveFn) -> CalibrationRun:
        """Calibrate every stage and solve every group, in order."""
        per_sample = sum(len(self._passes(st)) for st in self.stages if st.nodes)
        bar = tqdm(
            total=per_sample * len(self.samples),
            desc="calibrating",
            unit="run",
            disable=not self.options.progress,
            dynamic_ncols=True,
        )
        try:
            for stage in self.stages:
                bar.set_postfix_str(_label(stage), refresh=False)
                stats = self._run_stage(stage, bar)
                if stats is not None:
                    assert stage.group is not None  # statistics are gathered for a group only
                    t0 = time.perf_counter()
                    H, G = stats.finalize()
                    del stats
                    self._quant_weights.update(solve(stage.group, H, G))
                    self.run_info.seconds["solve"] += time.perf_counter() - t0
                self._free(stage)
        finally:
            bar.close()
        return self.run_info

    def _run_stage(self, stage: Stage, bar) -> GroupStats | None:
        group = stage.group
        stats = None if group is None else GroupStats(group.in_features, self.device)
        passes = self._passes(stage)
        if stage.act_scales:
            self._fit_act_scales(stage)
        session = self._session(stage) if stage.nodes else None
        measured = [name for _, name in stage.target_outputs]
        sums = np.zeros((len(measured), 2))
        tokens = 0
        fed = fed_constants(self.model, stage)
        float_consts = {n: constant(self.model.graph.initializers[n]).numpy() for n in fed}
        quant_consts = {**float_consts, **{w: self._quant_weights[w] for w in stage.weights}}
        for s in range(len(self.samples)):
            layer_outputs = {}
            for side, where in passes:
                if session is None:
                    break
                feeds = {n: self._lookup(side, n, s) for n in stage.inputs}
                feeds.update(quant_consts if side == "quant" else float_consts)
                t0 = time.perf_counter()
                what = f"the stage of {_label(stage)} ({_STREAM[side]}, sample {s})"
                outputs = dict(
                    zip(
                        stage.run_outputs,
                        run_session(session, stage.run_outputs, feeds, what),
                        strict=False,
                    )
                )
                self.run_info.seconds["stages"] += time.perf_counter() - t0
                self.run_info.session_runs += 1
                self._store(where, stage.outputs, [outputs[n] for n in stage.outputs], s)
                layer_outputs[side] = [outputs[n] for n in measured]
                bar.update(1)
            if measured:
                mask = self._mask(s)
                for i, (y, y_quant) in enumerate(
                    zip(layer_outputs["float"], layer_outputs["quant"], strict=False)
                ):
                    y, y_quant = token_rows(y, mask), token_rows(y_quant, mask)
                    sums[i] += (_square_sum(y), _square_sum(y - y_quant))
                tokens += y.shape[0]
        if stats is not None:
            assert group is not None  # statistics are gathered for a group only
            # After all the stage's runs, not between them: torch's OpenMP workers spin for a
            # while after each parallel op and would slow the next ONNX Runtime run down.
            t0 = time.perf_counter()
            for s in range(len(self.samples)):
                self._accumulate(stats, group, s)
            self.run_info.seconds["statistics"] += time.perf_counter() - t0
        for (node, _), (ref, err) in zip(stage.target_outputs, sums, strict=False):
            self.run_info.output_error[node] = (ref / tokens, err / tokens)
        if self.options.reference == "stage" and group is not None:
            # The float stage's outputs only give this group's X (kept until here: a static
            # activation quantizer runs in a quant-only stage between its source and the group).
            self._values["float"].clear()
        if session is not None and self.options.profile:
            self._count_node_runs(session)
        return stats

    @staticmethod
    def _passes(stage: Stage) -> list[tuple[str, str]]:
        """``(side, store)`` of each run of a stage per sample."""
        if stage.shared:
            return [("shared", "shared")]
        if stage.quant_only:
            return [("quant", "quant")]
        return [("float", "float"), ("quant", "quant")]

    def _fit_act_scales(self, stage: Stage) -> None:
        """Fit static activation scales on the quantized stream's calibration activations and
        write them (and their zero points) into the model."""
        graph = self.model.graph
        for name in stage.act_scales:
            value = graph.initializers[name]
            static = value.meta[ACT_SCALE]
            arrays = [
                token_rows(self._lookup("quant", static.source, s), self._mask(s))
                for s in range(len(self.samples))
            ]
            scale, zero = fit_static_scale(arrays, static.spec)
            old = constant(value)
            value.const_value = ir.Tensor(np.asarray(scale, dtype=old.dtype.numpy()), name=name)
            if static.zero_point is not None:
                zp = graph.initializers[static.zero_point]
                zp.const_value = ir.Tensor(
                    np.asarray(zero, dtype=constant(zp).dtype.numpy()), name=static.zero_point
                )

    def _accumulate(self, stats: GroupStats, group: TargetGroup, s: int) -> None:
        x_quant = self._lookup("quant", group.input, s)
        x = self._float_input(group, s)
        for label, a in (("float", x), ("quantized", x_quant)):
            if not np.isfinite(a).all():
                raise QronosError(
                    f"NaN or Inf in the calibration activations of the {label} network at "
                    f"{group.input!r} (input of {group.targets[0].name}), sample {s}: check the "
                    "model and the calibration data"
                )
        stats.add(x, x_quant, self._mask(s))

    def _mask(self, s: int) -> np.ndarray | None:
        """Sample ``s``'s attention mask, or ``None`` when it has no padding."""
        mask = self.samples[s].get("attention_mask")
        return None if mask is None or mask.all() else mask

    def _float_input(self, group: TargetGroup, s: int):
        """``X`` of sample ``s``: the float stream's (or, in stage mode, the float stage's)
        group input, before any activation quantizer."""
        name = group.source or group.input
        for store in ("float", "shared"):
            if name in self._values[store]:
                return self._values[store][name][s]
        return self._lookup("float", name, s)

    def _session(self, stage: Stage):
        types = {n: np.asarray(self._lookup("quant", n, 0)).dtype for n in stage.inputs}
        proto = stage_model(self.model, stage, types)
        prefix = None
        if self.options.profile:
            prefix = os.path.join(tempfile.gettempdir(), f"qronos_stage{stage.index}_")
        session = make_session(
            proto,
            self.options.device,
            self.options.optimize_graph,
            prefix,
            f"calibration stage {stage.index}",
        )
        if not self.run_info.providers:
            self.run_info.providers = session.get_providers()
        return session

    def _count_node_runs(self, session) -> None:
        path = session.end_profiling()
        try:
            with open(path, encoding="utf-8") as f:
                events = json.load(f)
        finally:
            os.unlink(path)
        for event in events:
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                self.run_info.node_runs[event["name"][: -len("_kernel_time")]] += 1
