"""The one orchestrator: ``run`` takes a model (an ONNX file, a folder holding
``model.onnx``, or a Hugging Face checkpoint), ``Options``, calibration data and a writer, and
does everything in one order. The command line, the Python API and the Olive pass are thin
adapters over it (they differ in how options arrive and where output goes).

    checks that need no work (scheme, format, output place)     -> QronosError, nothing done
    [a checkpoint: exported to a temporary folder first]
    writer.reserve()              (files: lock the output, repair a killed run's leftovers,
                                   refuse existing outputs without force)
      load the model (memory-mapped), untie the lm_head if it is quantized
      select the targets          (an already quantized model is refused here, before any data)
      calibration samples         (tokenize the text, or complete the given feeds)
      rotations (rotate != none)  fold norms, R1, R2, R4; self-check against the original
                                  (then select the targets again: the rotated graph's)
      passes: activation quantizers -> calibrate and solve -> the format's rewrite
      writer.write(model, report) (files: staged and placed all or nothing)

The passes (``passes/``, ``formats/``) are ``onnx_ir`` passes with ``requires``/``ensures``
contracts that keep no state: each returns its results. The input model is never modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import onnx_ir as ir

from .budget import (
    Allocation,
    allocate,
    check_units,
    measure_units,
    plan_units,
    require_feasible,
    units_from_report,
)
from .calibration.data import calibration_samples
from .calibration.runner import CalibrationOptions, CalibrationRun
from .calibration.session import require_runnable_dtype
from .errors import CalibrationWarning, QronosError, RecipeWarning, RotationWarning
from .export import exported_checkpoint, resolve_model
from .files.scratch import ScratchArrays
from .formats.base import Format
from .ir.model_io import load_model
from .ir.signature import detect_signature
from .ir.targets import Skipped, Target, require_targets
from .ir.values import constant, keep_constants_in
from .options import WIKI_VITAL, Options
from .passes.act_quant import InsertActQuantPass, KernelActQuant
from .passes.calibrate import CalibrateSolvePass, Observer, SolveResult, TargetResult
from .passes.chain import run_passes
from .passes.lm_head import UntieLmHeadPass
from .passes.rotate import apply_rotations, refuse_layer_norms
from .passes.rotation_check import RotationCheckPass
from .quant import Grid, SolverWarning
from .registry import FORMATS, get_format
from .report import Report, RotationReport, build_report
from .scheme import Scheme

#: The warnings a run records in its report (they are printed as they happen, too).
RECORDED_WARNINGS = (CalibrationWarning, RecipeWarning, RotationWarning, SolverWarning)

#: ``make_report(files written) -> Report``, called by a writer once the model is saved.
ReportMaker = Callable[[list[Path]], Report]


class Writer(Protocol):
    """Where a run's output goes (files beside ``-o``, or an Olive model handler)."""

    output: Path  # the output model's path

    def check(self, model_path: Path | None) -> None:
        """Refuse an output place before any work (``QronosError``); ``None``: the model
        is not exported yet (a checkpoint)."""

    #: a folder of the run's for files it writes while working (activations beyond the
    #: memory budget), removed when the run ends; set by ``reserve``.
    scratch: Path | None

    def reserve(self) -> contextlib.AbstractContextManager:
        """Held for the whole run (a lock on the output, the repair of a killed run's
        leftovers, the refusal of outputs that exist without force, ``scratch``)."""

    def write(self, model: ir.Model, make_report: ReportMaker) -> Report:
        """Save the model and its report; return the report."""


@dataclass
class Quantized:
    """What the pass chain did (``quantize``).

    Attributes:
        scheme: the scheme it followed.
        samples: the calibration feeds.
        calibration: the engine options.
        results: every solved layer (``TargetResult``).
        skipped: the layers left in float, with the reason.
        run_info: what the calibration run did.
    """

    scheme: Scheme
    samples: Sequence[dict]
    calibration: CalibrationOptions
    results: list[TargetResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    run_info: CalibrationRun = field(default_factory=CalibrationRun)


def preflight(options: Options, data: Any = None) -> tuple[Scheme, list[str]]:
    """What needs no work: the scheme, whether the format holds its grids (the format's
    notes for the report), and warnings about options and data without effect."""
    scheme = Scheme.of(options)
    fmt = get_format(options.format)
    notes = fmt.check(scheme.grids)
    if scheme.candidates and fmt.stored_bytes(scheme.grid, 1, 1, 4) is None:
        raise QronosError(f"the {fmt.name} format does not declare its sizes: no size budget")
    if scheme.candidates and options.format == "qdq" and options.act_bits == 8:
        raise QronosError(
            "a size budget does not take format qdq with 8-bit activations (its 8-bit codes "
            "then gain zero points the budget does not count): use format matmulnbits"
        )
    if options.sensitivity is not None:
        read_report(options.sensitivity)
    _warn_unused_data(options, data)
    _warn_unused_options(options, fmt)
    return scheme, notes


def run(
    model_path: str | os.PathLike,
    options: Options,
    writer: Writer,
    data: Any = None,
    observer: Observer | None = None,
) -> Report:
    """Quantize ``model_path`` as ``options`` say and hand the result to ``writer``.

    Args:
        model_path: an ONNX model file, a folder holding ``model.onnx``, or a Hugging Face
            checkpoint folder (exported first: ``qronos_onnx.export``).
        data: calibration feeds (an iterable of dicts or a ``CalibrationDataReader``) used
            instead of ``options.calib_data``'s text.
        observer: called after each group is solved (tests check statistics with it).
    Returns:
        The report (also written by the writer).
    """
    t0 = time.perf_counter()
    scheme, notes = preflight(options, data)
    model_path, checkpoint = resolve_model(model_path)
    if checkpoint:
        writer.check(None)
        with exported_checkpoint(model_path, writer.output, options) as float_model:
            return _run(float_model, options, scheme, notes, writer, data, observer, t0)
    return _run(model_path, options, scheme, notes, writer, data, observer, t0)


def _run(model_path, options, scheme, notes, writer, data, observer, t0) -> Report:
    writer.check(model_path)
    messages: list[str] = []
    with writer.reserve(), recording(messages):
        model = load_model(model_path)
        with constants_on_disk(model, writer.scratch):
            detect_signature(model)
            require_runnable_dtype(model, options.device)
            if scheme.lm_head != "skip":
                run_passes(model, [UntieLmHeadPass(scheme.include, scheme.exclude)])
            require_targets(model, *scheme.select(model))
            if options.rotate != "none":
                refuse_layer_norms(model)
            samples: list[dict] = []
            if options.needs_data:
                source = options.calib_data if data is None else data
                samples = calibration_samples(
                    model_path,
                    detect_signature(model),
                    source,
                    options.calib_windows,
                    options.seqlen,
                    options.tokenizer,
                )
            rotation = None
            if options.rotate != "none":
                rotation = rotate_model(model, model_path, samples, options)
            groups, skipped = scheme.select(model)
            # (after the data: an error there says all there is, in one line)
            scheme.warn_mismatches([t for g in groups for t in g.targets], skipped)
            calibration = CalibrationOptions(
                reference=options.reference,
                device=options.device,
                progress=options.progress,
                max_memory=memory_budget(options.max_memory),
                spill_dir=writer.scratch,
            )
            fmt = get_format(options.format)
            kernel = functools.partial(fmt.kernel_act_quant, options)
            allocation = None
            if scheme.candidates:
                scheme, allocation = choose_grids(
                    model, model_path, options, scheme, samples, calibration, kernel, writer.scratch
                )
            rewrite = fmt.rewrite_pass(options)
            solved = quantize(model, scheme, samples, calibration, rewrite, observer, kernel)
            notes = [*notes, *getattr(rewrite, "notes", [])]  # how the format wrote layers

            def make_report(files: list[Path]) -> Report:
                return build_report(
                    model_path,
                    writer.output,
                    files,
                    solved,
                    options.format,
                    options.non_defaults(),
                    notes,
                    messages,
                    time.perf_counter() - t0,
                    rotation,
                    allocation,
                )

            return writer.write(model, make_report)


def choose_grids(
    model: ir.Model,
    model_path: Path,
    options: Options,
    scheme: Scheme,
    samples: Sequence[dict],
    calibration: CalibrationOptions,
    kernel: KernelActQuant,
    scratch: Path | None,
) -> tuple[Scheme, Allocation]:
    """A size budget's grids (``budget.py``): every group of ``model`` (prepared: lm_head
    untied, rotated) measured at every candidate grid, by a calibration run on a second copy
    prepared the same way, or read from ``options.sensitivity``; then the knapsack. Returns
    the scheme with the chosen grids assigned, and the allocation for the report."""
    fmt = get_format(options.format)
    groups, _ = scheme.select(model)

    def layer_bytes(grid: Grid, target: Target) -> int:
        itemsize = int(constant(model.graph.initializers[target.weight]).dtype.itemsize)
        size = fmt.stored_bytes(grid, target.out_features, target.in_features, itemsize)
        assert size is not None  # preflight refused formats that do not declare it
        return size

    units = plan_units(groups, scheme.candidates_for, layer_bytes)
    assert options.bits_per_weight is not None  # scheme.candidates come with a budget
    require_feasible(units, options.bits_per_weight)  # before the measuring run
    if options.sensitivity is not None:
        reused = units_from_report(read_report(options.sensitivity))
        check_units(reused, units)
        units = reused
    else:
        probe = load_model(model_path)
        with constants_on_disk(probe, scratch):
            if scheme.lm_head != "skip":
                run_passes(probe, [UntieLmHeadPass(scheme.include, scheme.exclude)])
            if options.rotate != "none":  # as the model was (it was checked then)
                apply_rotations(probe, options.rotate, options.rotate_sites, options.rotate_seed)
            passes = [
                InsertActQuantPass(scheme, kernel),
                CalibrateSolvePass(scheme, samples, calibration, measure=True),
            ]
            measured = next(r for r in run_passes(probe, passes) if isinstance(r, SolveResult))
        measure_units(units, measured.measured, measured.run_info.output_error)
    allocation = allocate(units, options.bits_per_weight, options.mix_weighting)
    return dataclasses.replace(scheme, assigned=allocation.assigned), allocation


def read_report(path: str | os.PathLike) -> dict:
    """A report written by an earlier run (``QronosError`` when it cannot be read)."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QronosError(f"cannot read the report {path}: {err}") from err
    if not isinstance(report, dict):
        raise QronosError(f"{path} is not a qronos-onnx report")
    return report


def memory_budget(gigabytes: float | None) -> int:
    """The activations' budget in bytes: ``gigabytes``, or half of the memory available now
    (Linux's ``MemAvailable``; 8 GB where it cannot be read)."""
    if gigabytes is not None:
        return int(gigabytes * 1e9)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return available * 1024 // 2
    except (OSError, StopIteration, ValueError):
        return 8 * 10**9


def rotate_model(
    model: ir.Model, original: Path, samples: Sequence[dict], options: Options
) -> RotationReport:
    """Fold the norms and apply the rotations ``options`` name to ``model`` in place
    (``passes/rotate.py``), then check it against the ``original`` file on the first
    calibration sample (``passes/rotation_check.py``: a ``QronosError`` when they disagree)."""
    log = apply_rotations(model, options.rotate, options.rotate_sites, options.rotate_seed)
    (check,) = run_passes(model, [RotationCheckPass(original, samples, log, options.device)])
    return RotationReport.of(log, check.check, options.rotate_seed)  # type: ignore[attr-defined]


@contextlib.contextmanager
def constants_on_disk(model: ir.Model, scratch: Path | None) -> Iterator[None]:
    """Keep the large constants the run writes into ``model`` (rotated weights, packed codes)
    in memory-mapped files under ``scratch`` (the run's staging folder; the system's
    temporary folder when ``None``), unlinked at once: file-backed pages, not the process's
    heap, until the output is written (``ir.values.keep_constants_in``)."""
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qronos_constants_", dir=scratch) as folder:
        keep_constants_in(model.graph, ScratchArrays(Path(folder) / "constant"))
        try:
            yield
        finally:
            keep_constants_in(model.graph, None)


def quantize_model(
    model: ir.Model,
    scheme: Scheme,
    samples: Sequence[dict],
    calibration: CalibrationOptions | None = None,
    fmt: str | None = "matmulnbits",
    observer: Observer | None = None,
    options: Options | None = None,
) -> Quantized:
    """The whole pass chain on an in-memory model: untie a quantized lm_head, then
    ``quantize`` with the rewrite of format ``fmt`` (``None``: leave the fake-quantized float
    weights), whose options (``accuracy_level``) come from ``options``."""
    if scheme.lm_head != "skip":
        run_passes(model, [UntieLmHeadPass(scheme.include, scheme.exclude)])
    if fmt is None:
        return quantize(model, scheme, samples, calibration, None, observer)
    options = options or Options()
    written = get_format(fmt)
    kernel = functools.partial(written.kernel_act_quant, options)
    rewrite = written.rewrite_pass(options)
    return quantize(model, scheme, samples, calibration, rewrite, observer, kernel)


def quantize(
    model: ir.Model,
    scheme: Scheme,
    samples: Sequence[dict],
    calibration: CalibrationOptions | None = None,
    rewrite: ir.passes.PassBase | None = None,
    observer: Observer | None = None,
    kernel: KernelActQuant | None = None,
) -> Quantized:
    """Activation quantizers (the scheme's, then what the format's ``kernel`` does to a
    layer's input), calibrate and solve, and the format's ``rewrite`` (``None``: leave the
    fake-quantized float weights), on a model whose lm_head is untied when it is quantized."""
    calibration = calibration or CalibrationOptions()
    passes: list[ir.passes.PassBase] = [
        InsertActQuantPass(scheme, kernel),
        CalibrateSolvePass(scheme, samples, calibration, observer),
    ]
    if rewrite is not None:
        passes.append(rewrite)
    solved = next(r for r in run_passes(model, passes) if isinstance(r, SolveResult))
    return Quantized(scheme, samples, calibration, solved.results, solved.skipped, solved.run_info)


@contextlib.contextmanager
def recording(messages: list[str]) -> Iterator[None]:
    """Append the message of every ``RECORDED_WARNINGS`` warning issued in the block to
    ``messages``; every warning is shown as usual, as it happens (each one, not once per
    place: a run is one command)."""
    with warnings.catch_warnings():
        for category in RECORDED_WARNINGS:
            warnings.simplefilter("always", category)
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RECORDED_WARNINGS):
                messages.append(str(message))
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        yield


def _warn_unused_options(options: Options, fmt: Format) -> None:
    """Warn about options that have no effect on this run (``RecipeWarning``): a damping for
    a solver that takes none, an option only other formats read."""
    solver = options.solver
    if options.damping is not None and solver.damping is None:
        warnings.warn(
            f"{solver.name} takes no damping; damping {options.damping} is not used",
            RecipeWarning,
            stacklevel=3,
        )
    defaults = Options()
    for name in {o for entry in FORMATS for o in get_format(entry).options} - set(fmt.options):
        if getattr(options, name) != getattr(defaults, name):
            users = [f for f in FORMATS if name in get_format(f).options]
            warnings.warn(
                f"{name} is an option of the {', '.join(users)} format; the {fmt.name} format "
                "does not use it",
                RecipeWarning,
                stacklevel=3,
            )


def _warn_unused_data(options: Options, data: Any) -> None:
    """Warn about calibration data given to a run that reads none."""
    given = (
        data
        if data is not None
        else (options.calib_data if options.calib_data != WIKI_VITAL else None)
    )
    if not options.needs_data and given is not None:
        what = (
            repr(str(given))
            if isinstance(given, (str, os.PathLike))
            else f"(a {type(given).__name__})"
        )
        warnings.warn(
            f"{options.solver.summary} without activation quantization reads no calibration "
            f"data; calib_data {what} is not used",
            RecipeWarning,
            stacklevel=3,
        )
