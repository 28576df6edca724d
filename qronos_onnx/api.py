"""The Python API: ``optimize`` and ``evaluate``.

    import qronos_onnx
    report = qronos_onnx.optimize("model.onnx", "model-w4.onnx")                  # --w4
    report = qronos_onnx.optimize("model.onnx", "m.onnx", "w4a4", algo="gptq")    # a preset
    report = qronos_onnx.optimize("model.onnx", "m.onnx", "recipe.yaml", seqlen=256)
    result = qronos_onnx.evaluate("m.onnx", reference="model.onnx")

``optimize``'s keyword arguments are the fields of ``OptimizeConfig`` (``options.py``), the
same options as the command line's flags and a recipe file's keys.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .arguments import check_int, check_path, check_str
from .calibration.data import check_context, default_tokenizer, token_windows
from .config import check_format, recipe_for
from .errors import QronosError
from .eval import EvalResult, evaluate_windows
from .export import MODEL_FILE, export_checkpoint, is_checkpoint
from .ir.model_io import check_output_path, load_model
from .ir.signature import detect_signature
from .options import (
    DEFAULT_EVAL_WINDOWS,
    DEFAULT_SEQLEN,
    WIKI_VITAL,
    OptimizeConfig,
    fields,
    option,
)
from .pipeline import run
from .report import Report
from .writers import default_file_writer


def optimize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    config: OptimizeConfig | str | os.PathLike | None = None,
    **overrides: Any,
) -> Report:
    """Quantize the ONNX LLM ``model`` into ``output`` (``.onnx``; its data file, report and
    tokenizer are written beside it, all or nothing). Returns the report.

    ``model`` may also be a Hugging Face checkpoint directory: it is exported first
    (``qronos_onnx.export``: ONNX Runtime GenAI's model builder, or ``torch.onnx``) into a
    temporary directory, or into ``OUTPUT_DIR/float`` with ``keep_float``; ``output`` may then
    name a directory (the model is ``output/model.onnx``).

    Args:
        config: an ``OptimizeConfig``, a preset name (``w4``, ``w3``, ``w2``, ``w4a4``,
            ``w8a8``) or a YAML recipe file; default ``w4``.
        **overrides: options applied on top of ``config`` (listed below). ``calib_data`` may
            also be an iterable of feed dicts or an ONNX Runtime ``CalibrationDataReader``
            (then ``calib_windows``, ``seqlen`` and ``tokenizer`` are not used).

    Raises:
        TypeError: an option of the wrong type (named), before any work.
        QronosError: a bad value, an unsupported model or a failure a user can fix.
    """
    check_path("model", model)
    check_path("output", output)
    data = None
    if (
        "calib_data" in overrides
        and not isinstance(overrides["calib_data"], (str, os.PathLike))
        and overrides["calib_data"] is not None
    ):
        data = overrides.pop("calib_data")  # feeds, not a text: not an option value
        _check_feeds(data)
    settings = resolve(config).replace(**overrides)
    if not is_checkpoint(model):
        return run(model, settings, default_file_writer(output, settings), data)
    output = Path(output) if Path(output).suffix == ".onnx" else Path(output) / MODEL_FILE
    writer = default_file_writer(output, settings)
    check_format(recipe_for(settings), settings.format)  # what needs no work, first
    check_output_path(output, [], settings.force, [writer.report] if writer.report else [])
    with _exported(model, output, settings) as float_model:
        return run(float_model, settings, writer, data)


@contextlib.contextmanager
def _exported(
    checkpoint: str | os.PathLike, output: Path, settings: OptimizeConfig
) -> Iterator[Path]:
    """The float ONNX model of a checkpoint, exported for the run: kept in ``float/`` beside
    the output with ``keep_float``, else in a temporary directory removed afterwards."""
    if settings.keep_float:
        float_dir = output.parent / "float"
        if not (float_dir / MODEL_FILE).is_file():
            export_checkpoint(checkpoint, float_dir, settings.export_dtype, settings.exporter)
        yield float_dir / MODEL_FILE
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".float.", dir=output.parent) as tmp:
        path, _ = export_checkpoint(
            checkpoint, Path(tmp) / "float", settings.export_dtype, settings.exporter
        )
        yield path


def resolve(config: OptimizeConfig | str | os.PathLike | None) -> OptimizeConfig:
    """An ``OptimizeConfig`` from what ``optimize`` accepts as ``config``."""
    if config is None:
        return OptimizeConfig()
    if isinstance(config, OptimizeConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return OptimizeConfig.from_recipe(config)
    raise TypeError(
        f"config must be an OptimizeConfig, a preset name or a recipe file, got "
        f"{config!r} ({type(config).__name__})"
    )


def _check_feeds(data: Any) -> None:
    """Calibration feeds: a ``CalibrationDataReader`` or an iterable of dicts (their items are
    checked as they are read)."""
    if hasattr(data, "get_next"):
        return
    if isinstance(data, (dict, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"calib_data must be a text file, '{WIKI_VITAL}', a "
            f"CalibrationDataReader or an iterable of feed dicts, got {data!r} "
            f"({type(data).__name__})"
        )


def _document_options() -> None:
    """Give ``optimize`` the options as keyword-only parameters in its signature and a list in
    its docstring, from ``OptimizeConfig`` (``help(qronos_onnx.optimize)``)."""
    params = list(inspect.signature(optimize).parameters.values())[:3]
    lines = ["", "    Options (defaults in parentheses):", ""]
    for f in fields():
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default))
        lines.append(f"        {f.name} ({f.default!r}): {option(f).help}")
    optimize.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        params, return_annotation=Report
    )
    optimize.__doc__ = (optimize.__doc__ or "") + "\n".join(lines) + "\n"


_document_options()


def evaluate(
    model: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    data: str | os.PathLike = WIKI_VITAL,
    windows: int = DEFAULT_EVAL_WINDOWS,
    seqlen: int = DEFAULT_SEQLEN,
    tokenizer: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
) -> EvalResult:
    """Perplexity (and KL / top-1 agreement against ``reference``) on the first ``windows``
    windows of ``data`` (the test side of wiki-vital by default)."""
    check_path("model", model)
    check_path("reference", reference, optional=True)
    check_path("data", data)
    check_path("tokenizer", tokenizer, optional=True)
    check_int("windows", windows)
    check_int("seqlen", seqlen)
    check_str("device", device)
    if windows < 1 or seqlen < 2:
        raise QronosError("evaluation needs at least one window of two tokens")
    paths = [path for path in (model, reference) if path is not None]
    # clear errors for either model
    signatures = [detect_signature(load_model(path)) for path in paths]
    for path, signature in zip(paths, signatures, strict=False):
        signature.check_seqlen(seqlen)
        check_context(path, seqlen)
    vocabs = {s.vocab for s in signatures}
    if None not in vocabs and len(vocabs) > 1:
        raise QronosError(
            f"the model has a vocabulary of {signatures[0].vocab} tokens and the "
            f"reference model {signatures[1].vocab}: compare models that share one"
        )
    chosen = token_windows(
        data, tokenizer or default_tokenizer(model), seqlen, windows, "test", random=False
    )
    for signature in signatures:
        signature.check_token_ids(chosen)
    return evaluate_windows(model, chosen, reference, device, progress, signatures)
