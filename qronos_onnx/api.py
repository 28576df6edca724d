"""The Python API: ``optimize`` and ``evaluate``.

    import qronos_onnx
    report = qronos_onnx.optimize("model.onnx", "model-w4.onnx")                  # --w4
    report = qronos_onnx.optimize("model.onnx", "m.onnx", "w4a4", algo="gptq")    # a preset
    report = qronos_onnx.optimize("model.onnx", "m.onnx", "recipe.yaml", seqlen=256)
    result = qronos_onnx.evaluate("m.onnx", reference="model.onnx")

The keyword arguments are the options declared in ``options.py`` (``Options`` for
``optimize``, ``EvalOptions`` for ``evaluate``): the same as the command line's flags and a
recipe file's keys, type-checked and range-checked there.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from .calibration.data import check_context, default_tokenizer, token_windows
from .errors import QronosError
from .eval import EvalResult, evaluate_windows
from .export import MODEL_FILE, resolve_model
from .ir.model_io import load_model
from .ir.signature import detect_signature
from .options import WIKI_VITAL, EvalOptions, Options
from .pipeline import run
from .recipes import options_from
from .report import Report
from .schema import fields, meta
from .writers import default_file_writer


def optimize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    config: Options | str | os.PathLike | None = None,
    **overrides: Any,
) -> Report:
    """Quantize the ONNX LLM ``model`` into ``output`` (``.onnx``; its data file, report and
    tokenizer are written beside it, all or nothing). Returns the report.

    ``model`` may also be a folder holding ``model.onnx``, or a Hugging Face checkpoint
    folder: it is exported first (``qronos_onnx.export``: ONNX Runtime GenAI's model builder,
    or ``torch.onnx``) into a temporary folder, or into ``OUTPUT_DIR/float`` with
    ``keep_float``; ``output`` may then name a folder (the model is ``output/model.onnx``).

    Args:
        config: ``Options``, a preset name (``w4``, ``w3``, ``w2``, ``w4a4``, ``w8a8``) or a
            YAML recipe file; default ``w4``.
        **overrides: options applied on top of ``config`` (listed below). ``calib_data`` may
            also be an iterable of feed dicts or an ONNX Runtime ``CalibrationDataReader``
            (then ``calib_windows``, ``seqlen`` and ``tokenizer`` are not used).

    Raises:
        TypeError: an option of the wrong type (named), before any work.
        QronosError: a bad value, an unsupported model or a failure a user can fix.
    """
    _check_path("model", model)
    _check_path("output", output)
    data = None
    if (
        "calib_data" in overrides
        and not isinstance(overrides["calib_data"], (str, os.PathLike))
        and overrides["calib_data"] is not None
    ):
        data = overrides.pop("calib_data")  # feeds, not a text: not an option value
        _check_feeds(data)
    settings = resolve(config, **overrides)
    _, checkpoint = resolve_model(model)
    if checkpoint and Path(output).suffix != ".onnx":
        output = Path(output) / MODEL_FILE
    return run(model, settings, default_file_writer(output, settings), data)


def resolve(config: Options | str | os.PathLike | None, **overrides: Any) -> Options:
    """``Options`` from what ``optimize`` accepts as ``config``, with ``overrides`` applied
    (checked together with a recipe's values: an override can replace a value the recipe
    gets wrong)."""
    if config is None:
        config = "w4"
    if isinstance(config, Options):
        return config.replace(**overrides)
    if isinstance(config, (str, os.PathLike)):
        return options_from(config, **overrides)
    raise TypeError(
        f"config must be Options, a preset name or a recipe file, got "
        f"{config!r} ({type(config).__name__})"
    )


def _check_path(name: str, value: Any) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be a path (str or os.PathLike), got {value!r} ({type(value).__name__})"
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


def evaluate(model: str | os.PathLike, **options: Any) -> EvalResult:
    """Perplexity (and KL / top-1 agreement against ``reference``) on the first ``windows``
    windows of ``data`` (the test side of wiki-vital by default); the options are those of
    ``EvalOptions`` (listed below)."""
    _check_path("model", model)
    settings = EvalOptions().replace(**options)
    model, _ = resolve_model(model)  # a folder holding model.onnx names that model
    reference = None if settings.reference is None else resolve_model(settings.reference)[0]
    paths = [path for path in (model, reference) if path is not None]
    # clear errors for either model
    signatures = [detect_signature(load_model(path)) for path in paths]
    for path, signature in zip(paths, signatures, strict=False):
        signature.check_seqlen(settings.seqlen)
        check_context(path, settings.seqlen)
    vocabs = {s.vocab for s in signatures}
    if None not in vocabs and len(vocabs) > 1:
        raise QronosError(
            f"the model has a vocabulary of {signatures[0].vocab} tokens and the "
            f"reference model {signatures[1].vocab}: compare models that share one"
        )
    chosen = token_windows(
        settings.data,
        settings.tokenizer or default_tokenizer(model),
        settings.seqlen,
        settings.windows,
        "test",
        random=False,
    )
    for signature in signatures:
        signature.check_token_ids(chosen)
    return evaluate_windows(
        model, chosen, reference, settings.device, settings.progress, signatures
    )


def _document(function, schema: type, keep: int) -> None:
    """Give ``function`` the options of ``schema`` as keyword-only parameters in its signature
    and a list in its docstring (``help(qronos_onnx.optimize)``)."""
    params = list(inspect.signature(function).parameters.values())[:keep]
    lines = ["", "    Options (defaults in parentheses):", ""]
    for f in fields(schema):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default))
        lines.append(f"        {f.name} ({f.default!r}): {meta(f).help}")
    function.__signature__ = inspect.Signature(
        params, return_annotation=inspect.signature(function).return_annotation
    )
    function.__doc__ = (function.__doc__ or "") + "\n".join(lines) + "\n"


_document(optimize, Options, 3)
_document(evaluate, EvalOptions, 1)
