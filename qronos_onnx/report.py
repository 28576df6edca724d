"""The report of a run (``OUT.report.json``): what was quantized, how, how well, and at what
cost. ``Report`` is what ``optimize`` returns; ``Report.as_dict()`` is the JSON written."""

from __future__ import annotations

import dataclasses
import json
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QronosError
from .ir.model_io import model_files
from .ir.targets import Skipped
from .options import DEFAULT_REPORT
from .passes.calibrate import TargetResult
from .passes.rotate import RotationLog
from .passes.rotation_check import InputRange, RotationCheck

if TYPE_CHECKING:
    from .budget import Allocation
    from .pipeline import Quantized


@dataclass(frozen=True)
class LayerReport:
    """One quantized layer.

    Attributes:
        name, node: readable name (module path) and ONNX node name.
        shape: ``[out_features, in_features]``.
        grid: the grid's fields (bits, group_size, symmetric, narrow_range, scale_search).
        algorithm, act_order, damping, damping_retries, fell_back_to_rtn, dead_columns: how the
            solver got there (``quant.SolveInfo``; ``damping`` is the absolute ridge).
        error_rtn, error: relative output error ``||W X - Q X~||^2 / ||W X||^2`` on the
            calibration set of round-to-nearest codes and of the solved codes (``None`` when
            not measured; see ``passes.calibrate.TargetResult``).
        solve_seconds: time of the solve.
        parts: for a fused projection (a packed QKV), ``{part: [first row, end row]}`` of the
            output rows each of q, k and v takes; ``None`` for a plain layer.
    """

    name: str
    node: str
    shape: list[int]
    grid: dict[str, Any]
    algorithm: str
    act_order: bool
    damping: float
    damping_retries: int
    fell_back_to_rtn: bool
    dead_columns: int
    error_rtn: float | None
    error: float | None
    solve_seconds: float
    parts: dict[str, list[int]] | None = None

    @classmethod
    def of(cls, r: TargetResult) -> LayerReport:
        t, q = r.target, r.weight
        return cls(
            name=t.name,
            node=t.node,
            shape=[t.out_features, t.in_features],
            grid=dataclasses.asdict(q.grid),
            algorithm=q.info.algorithm,
            act_order=q.info.act_order,
            damping=q.info.damping,
            damping_retries=q.info.retries,
            fell_back_to_rtn=q.info.fell_back_to_rtn,
            dead_columns=q.info.dead_columns,
            error_rtn=r.error_rtn,
            error=r.error,
            solve_seconds=round(r.seconds, 4),
            parts={p: [a, b] for p, a, b in t.parts} or None,
        )


@dataclass(frozen=True)
class CalibrationSummary:
    """What calibration did: ``samples`` feeds, the ``reference`` stream, ``stages`` and ONNX
    Runtime ``session_runs``, the ``providers`` used, ``seconds`` by part, and the activations
    kept between stages: ``activations_mb`` (``peak_in_memory``, ``peak_on_disk``) and the
    batches each group's statistics were accumulated in (``stats_batches``)."""

    samples: int
    reference: str
    stages: int
    session_runs: int
    providers: list[str]
    seconds: dict[str, float]
    activations_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    stats_batches: list[int] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Totals:
    """Layers quantized, their parameters, bytes read and written, wall time, peak RSS."""

    targets: int
    quantized_parameters: int
    input_bytes: int
    output_bytes: int
    wall_seconds: float
    peak_rss_mb: float


@dataclass(frozen=True)
class InputRangeChange:
    """A layer group's input before and after the rotations (``passes.rotation_check``)."""

    layer: str
    before: dict[str, float]
    after: dict[str, float]


@dataclass(frozen=True)
class RotationReport:
    """The rotations of a run (``rotate="hadamard"``).

    Attributes:
        seed: the seed of the random signs.
        applied: ``{name, rotation, size, tensors, detail}`` per rotation applied (R1, R2, R4).
        skipped: ``{name, reason}`` per rotation that did not apply.
        folded_norms: RMSNorms whose scale went into the layers reading them.
        added_bytes: how much the float model grew (an untied embedding and lm_head, the
            online Hadamards' factors).
        check: the self-check: ``tokens`` compared, relative logits ``error``, ``tolerance``.
        inputs: each layer group's input range before and after (``max``, ``rms``,
            ``outlier``: the mean per-token ``max |x| / rms``).
    """

    seed: int
    applied: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    folded_norms: int
    added_bytes: int
    check: dict[str, float]
    inputs: list[InputRangeChange]

    @classmethod
    def of(cls, log: RotationLog, check: RotationCheck, seed: int) -> RotationReport:
        def summary(r: InputRange) -> dict[str, float]:
            return {"max": r.max, "rms": r.rms, "outlier": r.outlier}

        return cls(
            seed=seed,
            applied=[dataclasses.asdict(a) for a in log.applied],
            skipped=[{"name": n, "reason": r} for n, r in log.skipped],
            folded_norms=log.folded_norms,
            added_bytes=log.added_bytes,
            check={"tokens": check.tokens, "error": check.error, "tolerance": check.tolerance},
            inputs=[
                InputRangeChange(b.layer, summary(b), summary(a))
                for b, a in zip(check.before, check.after, strict=True)
            ],
        )


@dataclass(frozen=True)
class Report:
    """The report of one run (the README describes each field).

    Attributes:
        model, output: input and output model paths.
        format: ``matmulnbits``, ``qdq`` or ``float (fake-quantized)``.
        options: the non-default options of the run (as a recipe file lists them).
        scheme: the scheme the passes followed (grid, solver, patterns, activation
            quantizer).
        calibration: see ``CalibrationSummary``.
        targets: one ``LayerReport`` per quantized layer.
        skipped: the layers left in float, with the reason.
        notes: facts about the format (containers, conversions).
        warnings: the messages of the run's warnings (also printed as they happened).
        totals: see ``Totals``.
        rotation: see ``RotationReport``; ``None`` without rotations.
        budget: a size budget's allocation (``budget.Allocation``): every layer group with
            each candidate grid's stored bytes and measured errors (absolute, per target,
            beside ``output_ref``) and its choice; ``None`` without a budget.
    """

    model: str
    output: str
    format: str
    options: dict[str, Any]
    scheme: dict[str, Any]
    calibration: CalibrationSummary
    targets: list[LayerReport]
    skipped: list[Skipped]
    notes: list[str]
    warnings: list[str]
    totals: Totals
    rotation: RotationReport | None = None
    budget: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON structure of ``OUT.report.json``."""
        return dataclasses.asdict(self)

    def write(self, path: Path) -> Path:
        """Write the report as JSON to ``path`` (in place: write it into a staging
        directory to place it all or nothing); returns ``path``."""
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _files_bytes(paths: Sequence[Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).exists())


def build_report(
    model_path: str | Path,
    output: str | Path,
    files: Sequence[Path],
    solved: Quantized,
    fmt: str | None,
    options: dict[str, Any],
    notes: list[str],
    warnings: list[str],
    wall_seconds: float,
    rotation: RotationReport | None = None,
    allocation: Allocation | None = None,
) -> Report:
    """The report of one run. ``output`` is the output model's final path, ``files`` the files
    written for it so far (possibly still in a staging directory): their sizes make
    ``output_bytes``."""
    run = solved.run_info
    results = solved.results
    return Report(
        model=str(model_path),
        output=str(output),
        format=fmt or "float (fake-quantized)",
        options=options,
        scheme=json.loads(json.dumps(dataclasses.asdict(solved.scheme), default=str)),
        calibration=CalibrationSummary(
            samples=len(solved.samples),
            reference=solved.calibration.reference,
            stages=run.stages,
            session_runs=run.session_runs,
            providers=run.providers,
            seconds={k: round(v, 2) for k, v in run.seconds.items()},
            activations_mb={
                "peak_in_memory": round(run.store.peak_in_memory / 1e6, 1),
                "peak_on_disk": round(run.store.peak_on_disk / 1e6, 1),
            },
            stats_batches=list(run.stats_batches),
        ),
        targets=[LayerReport.of(r) for r in results],
        skipped=list(solved.skipped),
        notes=list(notes),
        warnings=list(warnings),
        totals=Totals(
            targets=len(results),
            quantized_parameters=sum(r.target.in_features * r.target.out_features for r in results),
            input_bytes=_files_bytes(sorted(model_files(model_path))),
            output_bytes=_files_bytes(files),
            wall_seconds=round(wall_seconds, 2),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        ),
        rotation=rotation,
        budget=None
        if allocation is None
        else json.loads(json.dumps(allocation.as_dict(), default=str)),
    )


def report_name(output: Path, name: str = DEFAULT_REPORT) -> str:
    """The report's file name for ``output``: ``name`` with ``{stem}`` replaced by the output's
    name without ``.onnx`` (nothing else is substituted)."""
    filled = name.replace("{stem}", output.stem)
    if "{" in filled or "}" in filled:
        raise QronosError(f"report name {name!r}: only {{stem}} may be used in braces")
    return filled
