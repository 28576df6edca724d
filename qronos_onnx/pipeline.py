"""The one orchestrator: ``run`` takes a model file, an ``OptimizeConfig``, calibration data
and a writer, and does everything in one order. The command line, the Python API and the Olive
pass are thin adapters over it (they differ in how options arrive and where output goes).

    checks that need no work (recipe, format, output place)     -> QronosError, nothing done
    writer.reserve()              (files: lock the output, SIGTERM/SIGHUP like Ctrl-C)
      load the model (memory-mapped), untie the lm_head if it is quantized
      find the targets            (an already quantized model is refused here, before any data)
      calibration samples         (tokenize the text, or complete the given feeds)
      rotations (rotate=hadamard) fold norms, R1, R2, R4; self-check against the original
                                  (then find the targets again: the rotated graph's)
      passes: activation quantizers -> calibrate and solve -> MatMulNBits | QDQ
      writer.write(model, report) (files: staged and placed all or nothing)

The passes (``passes/``) are ``onnx_ir`` passes with ``requires``/``ensures`` contracts, run
as one ``onnx_ir.passes.Sequential``; the input model is never modified.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import onnx_ir as ir

from .calibration.data import calibration_samples
from .calibration.runner import CalibrationOptions
from .config import Recipe, check_format, recipe_for, warn_recipe_mismatches
from .errors import CalibrationWarning, QronosError, RecipeWarning, RotationWarning
from .ir.model_io import load_model
from .ir.signature import detect_signature
from .ir.targets import find_targets, require_targets
from .options import WIKI_VITAL, OptimizeConfig
from .passes.act_quant import InsertActQuantPass
from .passes.calibrate import CalibrateSolvePass, Observer
from .passes.formats import ToMatMulNBitsPass, ToQDQPass
from .passes.lm_head import UntieLmHeadPass
from .passes.rotate import RotationLog, refuse_layer_norms, rotation_passes
from .passes.rotation_check import RotationCheckPass
from .quant import SolverWarning
from .report import Report, RotationReport, build_report

#: The warnings a run records in its report (they are printed as they happen, too).
RECORDED_WARNINGS = (CalibrationWarning, RecipeWarning, RotationWarning, SolverWarning)

#: ``make_report(files written) -> Report``, called by a writer once the model is saved.
ReportMaker = Callable[[list[Path]], Report]


class Writer(Protocol):
    """Where a run's output goes (files beside ``-o``, or an Olive model handler)."""

    output: Path  # the output model's path

    def check(self, model_path: Path) -> None:
        """Refuse an output place before any work (``QronosError``)."""

    def reserve(self) -> contextlib.AbstractContextManager:
        """Held for the whole run (a lock on the output)."""

    def write(self, model: ir.Model, make_report: ReportMaker) -> Report:
        """Save the model and its report; return the report."""


def run(
    model_path: str | os.PathLike,
    config: OptimizeConfig,
    writer: Writer,
    data: Any = None,
    observer: Observer | None = None,
) -> Report:
    """Quantize ``model_path`` as ``config`` says and hand the result to ``writer``.

    Args:
        data: calibration feeds (an iterable of dicts or a ``CalibrationDataReader``) used
            instead of ``config.calib_data``'s text.
        observer: called after each group is solved (tests check statistics with it).
    Returns:
        The report (also written by the writer).
    """
    t0 = time.perf_counter()
    model_path = Path(model_path)
    recipe = recipe_for(config)
    notes = check_format(recipe, config.format)
    if not model_path.is_file():
        raise QronosError(f"model file not found: {model_path}")
    _warn_unused_options(config, data)
    writer.check(model_path)
    messages: list[str] = []
    with writer.reserve(), recording(messages):
        model = load_model(model_path)
        detect_signature(model)
        if recipe.lm_head == "int8":
            run_passes(model, UntieLmHeadPass(recipe.include, recipe.exclude))
        groups, skipped = find_targets(
            model,
            include_lm_head=recipe.lm_head != "skip",
            include=recipe.include,
            exclude=recipe.exclude,
        )
        require_targets(model, groups, skipped)
        if config.rotate == "hadamard":
            refuse_layer_norms(model)
        samples = []
        if config.needs_data:
            source = config.calib_data if data is None else data
            samples = calibration_samples(
                model_path,
                detect_signature(model),
                source,
                config.calib_windows,
                config.seqlen,
                config.tokenizer,
            )
        rotation = None
        if config.rotate == "hadamard":
            rotation = rotate_model(model, model_path, samples, config.rotate_seed, config.device)
            groups, skipped = find_targets(
                model,
                include_lm_head=recipe.lm_head != "skip",
                include=recipe.include,
                exclude=recipe.exclude,
            )
        # (after the data: an error there says all there is, in one line)
        warn_recipe_mismatches(recipe, [t for g in groups for t in g.targets], skipped)
        calibration = CalibrationOptions(
            reference=config.reference, device=config.device, progress=config.progress
        )
        solved = quantize_model(
            model, recipe, samples, calibration, config.format, config.accuracy_level, observer
        )

        def make_report(files: list[Path]) -> Report:
            return build_report(
                model_path,
                writer.output,
                files,
                solved,
                config.format,
                config.recipe(),
                notes,
                messages,
                time.perf_counter() - t0,
                rotation,
            )

        return writer.write(model, make_report)


def rotate_model(
    model: ir.Model,
    original: Path,
    samples: Sequence[dict],
    seed: int = 0,
    device: str = "auto",
) -> RotationReport:
    """Fold the norms and apply the rotations R1, R2 and R4 to ``model`` in memory
    (``passes/rotate.py``), then check it against the ``original`` file on the first
    calibration sample (``passes/rotation_check.py``: a ``QronosError`` when they disagree)."""
    log = RotationLog()
    check = RotationCheckPass(original, samples, log, device)
    run_passes(model, ir.passes.Sequential(rotation_passes(log, seed), check))
    return RotationReport.of(log, check.check, seed)


def quantize_model(
    model: ir.Model,
    recipe: Recipe,
    samples: Sequence[dict],
    calibration: CalibrationOptions | None = None,
    fmt: str | None = "matmulnbits",
    accuracy_level: int | None = None,
    observer: Observer | None = None,
) -> CalibrateSolvePass:
    """The pass chain on an in-memory model: untie a quantized lm_head, activation
    quantizers, calibrate and solve, and the format (``None``: leave the fake-quantized float
    weights). Returns the solve pass (results, skipped layers, calibration run)."""
    solve = CalibrateSolvePass(recipe, samples, calibration, observer)
    passes: list[ir.passes.PassBase] = [InsertActQuantPass(recipe), solve]
    if recipe.lm_head == "int8":
        passes.insert(0, UntieLmHeadPass(recipe.include, recipe.exclude))
    if fmt == "matmulnbits":
        passes.append(ToMatMulNBitsPass(accuracy_level))
    elif fmt == "qdq":
        passes.append(ToQDQPass())
    run_passes(model, ir.passes.Sequential(*passes))
    return solve


def run_passes(model: ir.Model, passes: ir.passes.PassBase) -> ir.passes.PassResult:
    """Run ``passes`` on ``model``; a ``QronosError`` raised inside (which ``onnx_ir`` wraps in
    its pass errors) comes out as itself, so that the user sees one clear line."""
    try:
        return passes(model)
    except (ir.passes.PassError, ir.passes.InvariantError) as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, QronosError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


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


def _warn_unused_options(config: OptimizeConfig, data: Any) -> None:
    """Warn about options that have no effect on this run (``RecipeWarning``)."""
    given = (
        data
        if data is not None
        else (config.calib_data if config.calib_data != WIKI_VITAL else None)
    )
    if not config.needs_data and given is not None:
        what = (
            repr(str(given))
            if isinstance(given, (str, os.PathLike))
            else f"(a {type(given).__name__})"
        )
        warnings.warn(
            "round-to-nearest without activation quantization reads no calibration "
            f"data; calib_data {what} is not used",
            RecipeWarning,
            stacklevel=3,
        )
    if config.damping is not None and config.algo in ("rtn", "gpfq"):
        warnings.warn(
            f"{config.algo} takes no damping; damping {config.damping} is not used",
            RecipeWarning,
            stacklevel=3,
        )
    if config.accuracy_level is not None and config.format != "matmulnbits":
        warnings.warn(
            f"accuracy_level is a MatMulNBits attribute; the {config.format} format "
            "does not use it",
            RecipeWarning,
            stacklevel=3,
        )
