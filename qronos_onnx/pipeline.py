"""File in, file out: load, quantize, save. Nothing is written unless everything succeeded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .calibration.runner import CalibrationOptions
from .config import Recipe
from .ir.model_io import check_output_path, load_model, save_model
from .passes.quantize import QuantizePass


@dataclass
class QuantizationOutcome:
    """What ``quantize_file`` produced: the files written and the pass that did the work."""

    files: list[Path]
    quantize: QuantizePass


def quantize_file(model_path: str | os.PathLike, output: str | os.PathLike, recipe: Recipe,
                  samples: Sequence[dict], calibration: CalibrationOptions | None = None,
                  force: bool = False, observer=None) -> QuantizationOutcome:
    """Quantize ``model_path`` into ``output`` (a fake-quantized float model, for now).

    The output path is checked before any work and written only at the end; the input model
    and its data files are never modified.
    """
    output = check_output_path(output, [model_path], force)
    model = load_model(model_path)
    quantize = QuantizePass(recipe, samples, calibration, observer)
    quantize(model)
    return QuantizationOutcome(save_model(model, output), quantize)
