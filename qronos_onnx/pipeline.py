"""File in, file out: load, quantize, export, save, report. Nothing is written unless
everything succeeded; the input model and its data files are never modified."""

from __future__ import annotations

import filecmp
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx_ir as ir

from .calibration.runner import CalibrationOptions
from .config import Recipe
from .defaults import DEFAULT_REPORT
from .errors import QronosError
from .ir.model_io import (TOKENIZER_FILE, check_output_path, data_file_name, load_model,
                          write_model)
from .ir.packing import block_size_for, container_bits
from .passes.formats import ToMatMulNBitsPass, ToQDQPass
from .passes.quantize import QuantizePass
from .report import build_report, report_name, write_report
from .staging import staged_output

Format = Literal["matmulnbits", "qdq"]
FORMATS = ("matmulnbits", "qdq")


@dataclass
class QuantizationOutcome:
    """What ``quantize_file`` produced: the files written, the report and the pass."""

    files: list[Path]
    report: dict
    quantize: QuantizePass


def check_format(recipe: Recipe, fmt: Format | None) -> list[str]:
    """Refuse grids the format cannot hold, before any work; return notes for the report."""
    if fmt is not None and fmt not in FORMATS:
        raise QronosError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    notes = []
    grids = [recipe.grid, *(g for _, g in recipe.overrides)]
    if fmt == "matmulnbits":
        for grid in grids:
            if grid.group_size is not None:
                try:
                    block_size_for(grid.group_size, grid.group_size)
                except ValueError as err:
                    raise QronosError(f"{err}: use --format qdq, or --group-size 16/32/64/128")
            if container_bits(grid.bits) != grid.bits:
                notes.append(f"{grid.bits}-bit codes are stored in MatMulNBits' "
                             f"{container_bits(grid.bits)}-bit container (ONNX Runtime's kernel "
                             "takes 2, 4 and 8 bits); the file is that much larger")
    if fmt == "qdq":
        for grid in grids:
            if grid.bits not in (4, 8):
                notes.append(f"{grid.bits}-bit codes are stored as {'int4' if grid.bits < 4 else 'int8'}")
    return notes


def quantize_model(model: ir.Model, recipe: Recipe, samples: Sequence[dict],
                   calibration: CalibrationOptions | None = None, fmt: Format | None = "matmulnbits",
                   accuracy_level: int | None = None, observer=None) -> QuantizePass:
    """Quantize an in-memory model and write it in ``fmt``; returns the quantize pass."""
    quantize = QuantizePass(recipe, samples, calibration, observer)
    quantize(model)
    if fmt == "matmulnbits":
        ToMatMulNBitsPass(accuracy_level)(model)
    elif fmt == "qdq":
        ToQDQPass()(model)
    return quantize


def quantize_file(model_path: str | os.PathLike, output: str | os.PathLike, recipe: Recipe,
                  samples: Sequence[dict], calibration: CalibrationOptions | None = None,
                  force: bool = False, fmt: Format | None = "matmulnbits",
                  accuracy_level: int | None = None, report: str | None = DEFAULT_REPORT,
                  observer=None, tokenizer: str | os.PathLike | None = None) -> QuantizationOutcome:
    """Quantize ``model_path`` into ``output``.

    Model, data file, report and tokenizer are placed together, all or nothing
    (``qronos_onnx.staging.staged_output``); ``api.optimize`` also holds the output's lock
    around the whole run.

    Args:
        fmt: ``matmulnbits`` (default), ``qdq``, or ``None`` for a fake-quantized float model
            (dequantized weights; for inspection and tests).
        report: file name of the JSON report, written beside ``output``; ``None`` for none.
        tokenizer: a ``tokenizer.json`` (or a directory holding one) to place beside the
            output when none is there yet; an existing one that differs is kept, with a
            warning.
    """
    t0 = time.perf_counter()
    report_file = None if report is None else report_name(Path(output), report)
    output = check_output_path(output, [model_path], force, [] if report is None else [report_file])
    notes = check_format(recipe, fmt)
    model = load_model(model_path)
    quantize = quantize_model(model, recipe, samples, calibration, fmt, accuracy_level, observer)
    tokenizer_source = _tokenizer_to_copy(tokenizer, output.parent)
    names = [data_file_name(output), *([] if report is None else [report_file]),
             *([] if tokenizer_source is None else [TOKENIZER_FILE]), output.name]
    with staged_output(output, names, force) as staged:
        written = write_model(model, staged / output.name)
        result = build_report(model_path, output, written, quantize, fmt, notes,
                              time.perf_counter() - t0)
        if report is not None:
            written.append(write_report(result, staged / report_file))
        if tokenizer_source is not None:
            written.append(Path(shutil.copyfile(tokenizer_source, staged / TOKENIZER_FILE)))
    files = [output.parent / path.name for path in written]
    return QuantizationOutcome(files, result, quantize)


def _tokenizer_to_copy(tokenizer: str | os.PathLike | None, out_dir: Path) -> Path | None:
    """The ``tokenizer.json`` to place beside the output: ``tokenizer`` (a file or a directory
    holding one) when the output's directory has none. An existing one is never replaced; one
    that differs is kept with a warning (the model is evaluated and deployed with the
    tokenizer beside it)."""
    if tokenizer is None:
        return None
    source = Path(tokenizer)
    source = source / TOKENIZER_FILE if source.is_dir() else source
    target = out_dir / TOKENIZER_FILE
    if not (source.is_file() and source.name == TOKENIZER_FILE):
        return None
    if not target.exists():
        return source
    if not filecmp.cmp(source, target, shallow=False):
        warnings.warn(f"{target} differs from {source} and was kept; replace it if it is not "
                      "the model's tokenizer", UserWarning, stacklevel=3)
    return None
