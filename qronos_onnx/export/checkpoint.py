"""From a local Hugging Face checkpoint to a float ONNX model folder, ready for ``optimize``
and for ONNX Runtime GenAI: ``export_checkpoint`` (the ``export`` command) and
``exported_checkpoint`` (``optimize CHECKPOINT``).

Two exporters: ``genai``, ONNX Runtime GenAI's model builder (``builder.py``; the default when
it is installed and the dtype is float32), and ``torch``, ``torch.onnx`` of the transformers
model (``torch_export.py``), for what the builder does not cover. With ``auto`` a builder
failure falls back to ``torch.onnx`` with a warning. Nothing is downloaded: the checkpoint is
a local folder (``config.json`` and weights).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from qronos_onnx.errors import QronosError
from qronos_onnx.files.lock import output_lock
from qronos_onnx.files.paths import new_dirs, remove_empty
from qronos_onnx.files.placement import recover, staged_output
from qronos_onnx.files.signals import termination_as_interrupt
from qronos_onnx.genai import TOKENIZER_FILES
from qronos_onnx.options import ExportOptions, Options

from .builder import MODEL_FILE, BuilderFailed, builder_available, run_builder


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint folder: a ``config.json`` with a
    ``model_type`` and no ``model.onnx`` (a folder with one is an ONNX model's, even with
    the ``config.json`` an export copies beside it)."""
    folder = Path(path)
    config = folder / "config.json"
    if (folder / MODEL_FILE).exists() or not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data


def resolve_model(path: str | os.PathLike) -> tuple[Path, bool]:
    """What a model argument names: ``(path, is a checkpoint)``; a folder holding
    ``model.onnx`` names that file."""
    path = Path(path)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        return path / MODEL_FILE, False
    return path, path.is_dir() and is_checkpoint(path)


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions
) -> tuple[Path, str]:
    """Export ``checkpoint`` into ``out_dir`` (a new or empty folder, created) and return
    ``(model path, exporter used)``, all or nothing.

    ``auto`` uses the GenAI builder when it is installed and the dtype is float32, and
    ``torch.onnx`` otherwise or when the builder fails (with a warning quoting it).

    Raises:
        QronosError: not a checkpoint, an output folder that holds files, or an exporter
            failure (the message quotes its last line).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not is_checkpoint(checkpoint):
        raise QronosError(
            f"{checkpoint} is not a Hugging Face checkpoint folder (no config.json with a "
            "model_type, or it holds a model.onnx already)"
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise QronosError(f"{out_dir} is not a new or empty folder; export into a new one")
    if options.exporter == "genai" and not builder_available():
        raise QronosError(
            "the GenAI model builder is not installed: pip install "
            "'qronos-onnx[genai]' (or [genai-gpu] with onnxruntime-gpu)"
        )
    use_builder = options.exporter == "genai" or (
        options.exporter == "auto" and options.dtype == "fp32" and builder_available()
    )
    with _staging(out_dir) as tmp:
        used = "genai" if use_builder else "torch"
        if use_builder:
            try:
                run_builder(checkpoint, tmp, options.dtype)
            except BuilderFailed as err:
                if options.exporter == "genai":
                    raise
                why = str(err).rstrip(".")
                if not any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
                    why = f"the checkpoint has no tokenizer files, which the builder needs ({why})"
                warnings.warn(
                    f"{why}; exporting with torch.onnx instead", UserWarning, stacklevel=2
                )
                shutil.rmtree(tmp)
                tmp.mkdir()
                used = "torch"
        if used == "torch":
            from .torch_export import export_checkpoint_with_torch

            export_checkpoint_with_torch(checkpoint, tmp, options.dtype)
    return out_dir / MODEL_FILE, used


@contextlib.contextmanager
def exported_checkpoint(checkpoint: Path, output: Path, options: Options) -> Iterator[Path]:
    """The float ONNX model of a checkpoint, exported for a run writing ``output``: kept in
    ``float/`` beside the output with ``keep_float`` (and reused from there), else in a
    temporary folder removed afterwards. Folders made for it are removed again when the run
    fails and leaves them empty."""
    export = ExportOptions(dtype=options.export_dtype, exporter=options.exporter)
    created = new_dirs(output.parent)
    try:
        if options.keep_float:
            float_dir = output.parent / "float"
            if not (float_dir / MODEL_FILE).is_file():
                export_checkpoint(checkpoint, float_dir, export)
            yield float_dir / MODEL_FILE
            return
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".float.", dir=output.parent) as tmp:
            path, _ = export_checkpoint(checkpoint, Path(tmp) / "float", export)
            yield path
    except BaseException:
        remove_empty(created)
        raise


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A staging folder inside ``out_dir`` whose files are moved into it (created) when the
    block completes; on failure nothing stays."""
    with termination_as_interrupt(), output_lock(out_dir / MODEL_FILE, repair=recover):
        tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out_dir))
        try:
            yield tmp
            names = sorted(p.name for p in tmp.iterdir() if p.name != MODEL_FILE)
            with staged_output(out_dir / MODEL_FILE, [*names, MODEL_FILE]) as staged:
                for name in [*names, MODEL_FILE]:
                    os.replace(tmp / name, staged / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
