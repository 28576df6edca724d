"""The two-stream calibration engine: stage by stage through ONNX Runtime, window by window.

For every calibration window, each stage runs once per stream:

- the *float* stream runs the stage with the original weights on float inputs, and yields
  ``X``, the group input as the float network computes it;
- the *quant* stream runs it with the weights already solved (and activation quantizers, when
  the graph has them) on quantized-stream inputs, and yields ``X~``.

A stage made of nodes no target feeds runs once per window (both streams alike). ``H`` and
``G`` of the group the stage completes are accumulated from ``X`` and ``X~`` a batch of
windows at a time, the group is solved, and its solved weights are fed to the quant stream
from then on. Every node that depends on a target runs once per stream and window: the run
costs about two forward passes of the calibration set plus the solves.

Memory: only the values that cross a stage boundary are kept for every window, until their
last use, in a ``BoundaryStore`` (in memory up to ``max_memory`` bytes, in files beyond);
the group inputs of the statistics are held for a batch of windows (a quarter of the budget)
at most. With a budget that holds everything, the statistics are accumulated after all the
stage's runs, as one batch: torch's OpenMP workers spin for a while after each parallel op and
would slow ONNX Runtime's next run down.

``reference="stage"`` takes ``X`` instead from the float stage applied to the quant stream's
inputs (the block mode of the reference implementation); the float stream is then not kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import onnx_ir as ir
import torch
from tqdm.auto import tqdm

from qronos_onnx.errors import QronosError
from qronos_onnx.files.scratch import release_pages
from qronos_onnx.ir.act_quant import ACT_SCALE, StaticRange
from qronos_onnx.ir.stages import Stage, fed_constants, last_uses, stage_model
from qronos_onnx.ir.targets import TargetGroup
from qronos_onnx.ir.values import constant
from qronos_onnx.quant.problem import SecondMoments

from .bound import BoundRun
from .heap import return_freed_memory
from .session import CUDA, make_session, run_session
from .stats import GroupStats, token_rows
from .store import BoundaryStore, StoreUse

Reference = Literal["network", "stage"]

#: ``solve(group, moments) -> {weight name: solved weight in the model's layout}``; the
#: ``SecondMoments`` (``H``, ``G``) is owned: the solve frees them as it goes.
SolveFn = Callable[[TargetGroup, SecondMoments], dict[str, np.ndarray]]


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
        max_memory: bytes of activations kept in memory between stages (``BoundaryStore``);
            ``None``: no bound (nothing is written to disk).
        spill_dir: where activations beyond ``max_memory`` go (a folder of the run's); without
            one, a temporary folder.
        recompute_wide: compute an MLP's intermediate-wide down_proj input again in the next
            stage instead of keeping it for every window (``ir.stages.plan_stages``: gate/up
            run twice per window, the numbers are the same); ``None``: when keeping it in both
            streams would take more than half of ``max_memory``. Network reference only
            (``recomputes_wide``).
        io_binding: run stages through ONNX Runtime's I/O binding (``calibration/bound.py``:
            weights placed on the device once per stage, the statistics' inputs handed to
            torch on the device); ``None``: when the stage runs on CUDA.
    """

    reference: Reference = "network"
    device: str = "auto"
    progress: bool = True
    optimize_graph: bool = True
    profile: bool = False
    max_memory: int | None = None
    spill_dir: str | os.PathLike | None = None
    io_binding: bool | None = None
    recompute_wide: bool | None = None

    def __post_init__(self) -> None:
        if self.reference not in ("network", "stage"):
            raise QronosError(f"reference must be 'network' or 'stage', got {self.reference!r}")

    def recomputes_wide(self, tokens: int, widest: int) -> bool:
        """Whether wide group inputs are recomputed (``recompute_wide``) for ``tokens``
        calibration tokens and a widest group input of ``widest`` features. Never with
        ``reference="stage"``: its float stage reads the quantized stream's inputs, so a
        recomputed value would be made with float weights from them, not what it was."""
        if self.reference == "stage":
            return False
        if self.recompute_wide is not None:
            return self.recompute_wide
        kept = 2 * tokens * widest * 4  # both streams, float32 at most
        return self.max_memory is not None and kept > self.max_memory // 2


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
        store: what the boundary store held (bytes in memory and on disk, at most).
        kept: bytes the boundary store holds after each stage (memory and disk).
        stats_batches: how many batches the statistics were accumulated in, per group stage.
    """

    stages: int = 0
    session_runs: int = 0
    # A Counter (parts not yet timed read 0) of float seconds; typeshed's Counter counts ints.
    seconds: dict[str, float] = field(default_factory=lambda: cast("dict[str, float]", Counter()))
    providers: list[str] = field(default_factory=list)
    node_runs: Counter = field(default_factory=Counter)
    output_error: dict[str, tuple[float, float]] = field(default_factory=dict)
    store: StoreUse = field(default_factory=StoreUse)
    kept: list[int] = field(default_factory=list)
    stats_batches: list[int] = field(default_factory=list)


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
        self._quant_weights: dict[str, np.ndarray] = {}
        self._ranges: dict[str, StaticRange] = {}  # static scale -> its source's range so far
        self._last_use = last_uses(self.stages)
        # a target weight's solved values live until the last stage that runs its layer
        self._weight_last_use = {w: st.index for st in self.stages for w in st.weights}
        self._sources = {
            s.group.input: s.group.source
            for s in self.stages
            if s.group is not None and s.group.source is not None
        }
        self.run_info = CalibrationRun(stages=len(self.stages))

    # -- values ------------------------------------------------------------------------

    def _where(self, side: str) -> str:
        """The part of the store a stream reads its inputs from."""
        return "float" if side == "float" and self.options.reference == "network" else "quant"

    def _lookup(self, store: BoundaryStore, side: str, name: str, s: int):
        """Window ``s`` of value ``name`` as ``side`` (float / quant) sees it."""
        feed = self.samples[s]
        if name in feed:
            return feed[name]
        if side == "float" and name in self._sources:
            name = self._sources[name]  # the float network skips activation quantizers
        return store.get((self._where(side), name), s)

    def _free(self, store: BoundaryStore, stage: Stage) -> None:
        for name in [n for n, last in self._last_use.items() if last == stage.index]:
            for where in ("float", "quant"):
                store.drop((where, name))
        for name in stage.weights:
            if self._weight_last_use[name] == stage.index:
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
        with contextlib.ExitStack() as cleanup:
            folder = self.options.spill_dir
            if folder is None and self.options.max_memory is not None:
                folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="qronos_"))
            budget = self.options.max_memory
            store = BoundaryStore(
                len(self.samples),
                budget if budget is not None else 1 << 62,
                None if folder is None else Path(folder) / "activations",
            )
            cleanup.callback(store.clear)
            cleanup.callback(bar.close)
            for stage in self.stages:
                bar.set_postfix_str(_label(stage), refresh=False)
                stats = self._run_stage(stage, store, bar)
                if stats is not None:
                    assert stage.group is not None  # statistics are gathered for a group only
                    t0 = time.perf_counter()
                    moments = SecondMoments(*stats.finalize(), owned=True)
                    del stats
                    self._quant_weights.update(solve(stage.group, moments))
                    del moments
                    self.run_info.seconds["solve"] += time.perf_counter() - t0
                self._free(store, stage)
                return_freed_memory()
                self.run_info.kept.append(store.use.in_memory + store.use.on_disk)
            self.run_info.store = store.use
        return self.run_info

    def _run_stage(self, stage: Stage, store: BoundaryStore, bar) -> GroupStats | None:
        group = stage.group
        stats = None if group is None else GroupStats(group.in_features, self.device)
        passes = self._passes(stage)
        if stage.act_scales:
            self._fit_act_scales(stage)
        session = self._session(stage, store) if stage.nodes else None
        measured = [name for _, name in stage.target_outputs]
        sums = np.zeros((len(measured), 2))
        tokens = 0
        fed = fed_constants(self.model, stage)
        float_consts = {n: constant(self.model.graph.initializers[n]).numpy() for n in fed}
        quant_consts = {**float_consts, **{w: self._quant_weights[w] for w in stage.weights}}
        bound = self._bound(session, stage, float_consts, quant_consts)
        on_device = self._statistics_only(stage)
        keep = self.options.reference == "network"
        batch: list[tuple] = []  # (x, x_quant, mask) of windows not yet in the statistics
        batch_bytes = 0
        batches = 0
        for s in range(len(self.samples)):
            runs: dict[str, dict[str, np.ndarray]] = {}
            for side, where in passes:
                if session is None:
                    break
                feeds = {n: self._lookup(store, side, n, s) for n in stage.inputs}
                t0 = time.perf_counter()
                what = f"the stage of {_label(stage)} ({_STREAM[side]}, sample {s})"
                consts = "quant" if side == "quant" else "float"
                if bound is not None:
                    outputs = bound.run(consts, stage.run_outputs, feeds, on_device, what)
                else:
                    feeds.update(quant_consts if consts == "quant" else float_consts)
                    outputs = dict(
                        zip(
                            stage.run_outputs,
                            run_session(session, stage.run_outputs, feeds, what),
                            strict=False,
                        )
                    )
                self.run_info.seconds["stages"] += time.perf_counter() - t0
                self.run_info.session_runs += 1
                for name in stage.outputs:
                    # a value no target feeds, recomputed here, is alike in both streams
                    both = where == "shared" or (stage.quant_only and name in stage.observed)
                    for part in ("float", "quant") if both else (where,):
                        if part == "quant" or self._float_keeps(name, keep):
                            store.put((part, name), s, outputs[name])
                runs[side] = outputs
                bar.update(1)
            if session is not None:
                self._observe_ranges(stage, runs, s)
            if measured:
                mask = self._mask(s)
                for i, name in enumerate(measured):
                    y = token_rows(runs["float"][name], mask)
                    y_quant = token_rows(runs["quant"][name], mask)
                    sums[i] += (_square_sum(y), _square_sum(y - y_quant))
                tokens += y.shape[0]
            if stats is not None:
                assert group is not None  # statistics are gathered for a group only
                window = self._group_inputs(stage, group, runs, store, s)
                batch.append(window)
                batch_bytes += sum(a.nbytes for a in window[:2] if a is not None) // (
                    2 if window[0] is window[1] else 1
                )
                if self._batch_full(batch_bytes) or s == len(self.samples) - 1:
                    self._accumulate(stats, group, batch)
                    batch, batch_bytes, batches = [], 0, batches + 1
        if stats is not None:
            self.run_info.stats_batches.append(batches)
        for (node, _), (ref, err) in zip(stage.target_outputs, sums, strict=False):
            self.run_info.output_error[node] = (ref / tokens, err / tokens)
        if session is not None and self.options.profile:
            self._count_node_runs(session)
        for array in float_consts.values():  # the input weights' pages need not stay resident
            release_pages(array)
        return stats

    def _bound(self, session, stage: Stage, float_consts: dict, quant_consts: dict):
        """A ``BoundRun`` of the stage's session with both streams' constants on its device,
        when the stages run through I/O binding; else ``None``."""
        if session is None:
            return None
        binding = self.options.io_binding
        if binding is None:
            binding = session.get_providers()[0] == CUDA
        if not binding:
            return None
        bound = BoundRun(session)
        bound.bind_constants("float", float_consts)
        bound.bind_constants("quant", quant_consts)
        return bound

    def _statistics_only(self, stage: Stage) -> set[str]:
        """Outputs only the statistics read (the group input and the value it quantizes,
        unless kept between stages, measured, or observed for a static scale): a bound run
        hands them to torch on the device."""
        if stage.group is None:
            return set()
        names = {n for n in (stage.group.input, stage.group.source) if n is not None}
        other = {*stage.outputs, *(v for _, v in stage.target_outputs)}
        return {n for n in names if n not in other and not self._scales_of(n)}

    def _float_keeps(self, name: str, network: bool) -> bool:
        """Whether the float stream's value ``name`` is kept for later stages: never a
        quantizer's output (the float stream reads its source instead); in stage mode only a
        quantizer's source (its group's ``X``, the float stage's on the quantized inputs)."""
        if name in self._sources:
            return False
        return network or name in self._sources.values()

    def _batch_full(self, nbytes: int) -> bool:
        """Whether the windows held for the statistics reach a quarter of the budget."""
        budget = self.options.max_memory
        return budget is not None and nbytes >= budget // 4

    @staticmethod
    def _passes(stage: Stage) -> list[tuple[str, str]]:
        """``(side, store)`` of each run of a stage per sample."""
        if stage.shared:
            return [("shared", "shared")]
        if stage.quant_only:
            return [("quant", "quant")]
        return [("float", "float"), ("quant", "quant")]

    def _group_inputs(
        self, stage: Stage, group: TargetGroup, runs: dict, store: BoundaryStore, s: int
    ):
        """``(X, X~, mask)`` of window ``s``: the group input in both streams (one array for a
        stage both streams share), from this window's runs. ``X`` is the value before the
        quantizer (``group.source``); a quantizer-only stage reads it from the store (the float
        stream's, or in stage mode the float stage's on the quantized inputs), unless it
        recomputed it (a value no target feeds, alike in both streams)."""
        if "shared" in runs:
            x = runs["shared"][group.input]
            return x, x, self._mask(s)
        x_quant = runs["quant"][group.input]
        name = group.source or group.input
        if "float" in runs:
            x = runs["float"][name]
        elif name in stage.observed:
            x = runs["quant"][name]
        else:
            x = store.get(("float", name), s)
        return x, x_quant, self._mask(s)

    def _observe_ranges(self, stage: Stage, runs: dict, s: int) -> None:
        """Widen the ranges of the static scales whose source this stage computes (observed,
        quantized stream)."""
        side = "shared" if stage.shared else "quant"
        for name in stage.observed:
            for scale in self._scales_of(name):
                value = runs[side][name]
                self._ranges.setdefault(scale, StaticRange()).add(token_rows(value, self._mask(s)))

    def _scales_of(self, source: str) -> list[str]:
        return [
            scale
            for later in self.stages
            for scale in later.act_scales
            if self.model.graph.initializers[scale].meta[ACT_SCALE].source == source
        ]

    def _fit_act_scales(self, stage: Stage) -> None:
        """Write the static activation scales (and zero points) fitted on the ranges the
        earlier stage observed into the model."""
        graph = self.model.graph
        for name in stage.act_scales:
            value = graph.initializers[name]
            static = value.meta[ACT_SCALE]
            scale, zero = self._ranges.pop(name).fit(static.spec)
            old = constant(value)
            value.const_value = ir.Tensor(np.asarray(scale, dtype=old.dtype.numpy()), name=name)
            if static.zero_point is not None:
                zp = graph.initializers[static.zero_point]
                zp.const_value = ir.Tensor(
                    np.asarray(zero, dtype=constant(zp).dtype.numpy()), name=static.zero_point
                )

    def _accumulate(self, stats: GroupStats, group: TargetGroup, batch: list[tuple]) -> None:
        """Add a batch of windows to the statistics (after the stage's runs on them)."""
        t0 = time.perf_counter()
        for s_x, (x, x_quant, mask) in enumerate(batch):
            for label, a in (("float", x), ("quantized", x_quant)):
                finite = torch.isfinite(a) if isinstance(a, torch.Tensor) else np.isfinite(a)
                if not finite.all():
                    raise QronosError(
                        f"NaN or Inf in the calibration activations of the {label} network at "
                        f"{group.input!r} (input of {group.targets[0].name}), window {s_x}: "
                        "check the model and the calibration data"
                    )
            stats.add(x, x_quant, mask)
        self.run_info.seconds["statistics"] += time.perf_counter() - t0

    def _mask(self, s: int) -> np.ndarray | None:
        """Sample ``s``'s attention mask, or ``None`` when it has no padding."""
        mask = self.samples[s].get("attention_mask")
        return None if mask is None or mask.all() else mask

    def _session(self, stage: Stage, store: BoundaryStore):
        types = {n: np.asarray(self._lookup(store, "quant", n, 0)).dtype for n in stage.inputs}
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
