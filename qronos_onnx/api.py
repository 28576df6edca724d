"""The Python API: ``optimize`` and ``evaluate``, with the same options as the CLI.

    import qronos_onnx
    report = qronos_onnx.optimize("model.onnx", "model-w4.onnx", preset="w4")
    result = qronos_onnx.evaluate("model-w4.onnx", reference="model.onnx")
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .calibration.data import (WIKI_VITAL, all_windows, calibration_windows, feeds_from,
                               load_tokenizer, read_text)
from .arguments import (check_bool, check_calibration_data, check_float, check_int, check_path,
                        check_str, patterns)
from .calibration.runner import CalibrationOptions
from .config import Recipe, SolverOptions
from .defaults import (DEFAULT_EVAL_WINDOWS, DEFAULT_PRESET, DEFAULT_REPORT, DEFAULT_SEQLEN,
                       DEFAULT_WINDOWS)
from .errors import CalibrationWarning, QronosError, RecipeWarning
from .eval import EvalResult, evaluate_windows
from .ir.act_quant import ActQuant
from .ir.model_io import TOKENIZER_FILE, check_output_path, load_model
from .ir.signature import detect_signature
from .ir.patterns import check_patterns
from .pipeline import check_format, quantize_file
from .quant import Grid
from .report import report_name
from .staging import output_lock, termination_as_interrupt

#: Recipes behind ``--w4`` etc. Explicit options override any field.
PRESETS: dict[str, dict[str, Any]] = {
    "w4": dict(bits=4, group_size=128, symmetric=False),
    "w3": dict(bits=3, group_size=128, symmetric=False),
    "w2": dict(bits=2, group_size=32, symmetric=False),
    # W4A4: per-channel symmetric int4 weights, per-token int4 activations.
    "w4a4": dict(bits=4, group_size=None, symmetric=True, act_bits=4, act="token"),
    # W8A8: 7-bit symmetric per-channel weights in int8 and static uint8 activations, as QDQ:
    # ONNX Runtime's fast u8 x s8 integer kernels, exact on every x86 CPU (ir/int8_kernels.py;
    # benchmarks/RESULTS.md, "W8A8": as accurate as 8-bit uint8 weights, 1.35x faster).
    "w8a8": dict(bits=7, group_size=None, symmetric=True, act_bits=8, act="tensor",
                 act_symmetric=False, format="qdq"),
}


def parse_override(spec: str, default: Grid) -> tuple[str, Grid]:
    """``PATTERN=bits:8,group:32,sym`` -> ``(pattern, grid)``.

    Keys: ``bits:N``, ``group:N`` or ``group:channel``, ``sym`` or ``asym``; unspecified ones
    come from ``default``.
    """
    pattern, sep, rest = spec.rpartition("=")
    if not sep or not pattern:
        raise QronosError(f"override {spec!r}: expected PATTERN=bits:N,group:N|channel,sym|asym")
    check_patterns([pattern], "override")
    fields = {"bits": default.bits, "group_size": default.group_size, "symmetric": default.symmetric}
    items = [item for item in rest.split(",") if item]
    keys = [item.partition(":")[0] for item in items]
    if not items:
        raise QronosError(f"override {spec!r} sets nothing: give bits:N, group:N|channel, sym "
                          "or asym after '='")
    if len(set(keys)) < len(keys) or {"sym", "asym"} <= set(keys):
        raise QronosError(f"override {spec!r} sets a key twice or both sym and asym")
    for item in items:
        key, _, value = item.partition(":")
        try:
            if key == "bits":
                fields["bits"] = int(value)
            elif key == "group":
                fields["group_size"] = None if value == "channel" else int(value)
            elif key in ("sym", "asym") and not value:
                fields["symmetric"] = key == "sym"
            else:
                raise ValueError(item)
        except ValueError as err:
            raise QronosError(f"override {spec!r}: cannot read {item!r} (keys: bits:N, "
                              "group:N|channel, sym, asym)") from err
    try:
        return pattern, Grid(**fields)
    except ValueError as err:
        raise QronosError(f"override {spec!r}: {err}") from err


def build_recipe(preset: str | None = None, *, bits: int | None = None,
                 group_size: int | None = None, per_channel: bool = False,
                 symmetric: bool | None = None, algo: str = "qronos",
                 damping: float | None = None, act_order: bool = True,
                 exclude=(), include=(), lm_head: str = "skip",
                 overrides=()) -> tuple[Recipe, str | None]:
    """The recipe for a preset with explicit options; also returns the preset's format.

    ``overrides``: ``PATTERN=bits:N,group:N|channel,sym|asym`` strings (see
    ``parse_override``) or ``(pattern, Grid)`` pairs. Invalid values raise ``QronosError``.
    """
    preset = DEFAULT_PRESET if preset is None else preset
    if preset not in PRESETS:
        raise QronosError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if group_size is not None and per_channel:
        raise QronosError("give --group-size or --per-channel, not both")
    try:
        grid = Grid(bits=p["bits"] if bits is None else bits,
                    group_size=None if per_channel else
                    (p["group_size"] if group_size is None else group_size),
                    symmetric=p["symmetric"] if symmetric is None else symmetric)
        act = None
        if p.get("act") is not None:
            act = ActQuant(bits=p["act_bits"], granularity=p["act"],
                           symmetric=p.get("act_symmetric", True))
        recipe = Recipe(grid=grid, solver=SolverOptions(algorithm=algo, act_order=act_order,
                                                        damping=damping),
                        lm_head=lm_head, include=tuple(include), exclude=tuple(exclude),
                        overrides=tuple(_override(o, grid) for o in overrides),
                        act_quant=act)
    except ValueError as err:
        raise QronosError(str(err)) from err
    check_patterns(recipe.include, "include")
    check_patterns(recipe.exclude, "exclude")
    return recipe, p.get("format")


def _override(item: Any, default: Grid) -> tuple[str, Grid]:
    """One override: a ``PATTERN=SPEC`` string or a ``(pattern, Grid)`` pair."""
    if isinstance(item, str):
        return parse_override(item, default)
    if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], Grid)):
        return item
    raise TypeError(f"every item of overrides must be a 'PATTERN=SPEC' string or a (pattern, "
                    f"Grid) pair, got {item!r}")


def default_tokenizer(model: str | os.PathLike) -> Path:
    return Path(model).parent / TOKENIZER_FILE


def token_windows(data: str | os.PathLike, tokenizer, seqlen: int, count: int,
                  split: str, random: bool) -> np.ndarray:
    """Windows of a text file or wiki-vital: ``count`` drawn by the calibration protocol
    (``random``) or the first ``count`` (evaluation protocol)."""
    ids = load_tokenizer(tokenizer)(read_text(data, split))
    if random:
        return calibration_windows(ids, seqlen, count)
    windows = all_windows(ids, seqlen)
    if count > len(windows):
        raise QronosError(f"asked for {count} windows of {seqlen} tokens; {data} has {len(windows)}")
    return windows[:count]


def optimize(model: str | os.PathLike, output: str | os.PathLike, *, preset: str | None = None,
             bits: int | None = None, group_size: int | None = None, per_channel: bool = False,
             symmetric: bool | None = None, algo: str = "qronos", format: str | None = None,
             calib_data: Any = WIKI_VITAL, calib_windows: int = DEFAULT_WINDOWS,
             seqlen: int = DEFAULT_SEQLEN, tokenizer: str | os.PathLike | None = None,
             exclude=(), include=(), lm_head: str = "skip", overrides=(),
             device: str = "auto", force: bool = False, damping: float | None = None,
             act_order: bool = True,
             reference: str = "network", accuracy_level: int | None = None,
             report: str | None = DEFAULT_REPORT, progress: bool = True) -> dict:
    """Quantize an ONNX LLM; returns the report (also written as ``report`` beside ``output``).

    ``calib_data`` is a text file, ``"wiki-vital"`` (default), or an iterable of feed dicts /
    an ONNX Runtime ``CalibrationDataReader`` (then ``tokenizer``, ``calib_windows`` and
    ``seqlen`` are not used). See the README for every option.
    """
    check_path("model", model)
    check_path("output", output)
    check_path("tokenizer", tokenizer, optional=True)
    check_calibration_data("calib_data", calib_data)
    for name, value in (("calib_windows", calib_windows), ("seqlen", seqlen)):
        check_int(name, value)
    for name, value in (("bits", bits), ("group_size", group_size),
                        ("accuracy_level", accuracy_level)):
        check_int(name, value, optional=True)
    check_float("damping", damping, optional=True)
    for name, value in (("report", report), ("preset", preset), ("format", format)):
        check_str(name, value, optional=True)
    for name, value in (("algo", algo), ("lm_head", lm_head), ("device", device),
                        ("reference", reference)):
        check_str(name, value)
    for name, value in (("per_channel", per_channel), ("force", force),
                        ("act_order", act_order), ("progress", progress)):
        check_bool(name, value)
    check_bool("symmetric", symmetric, optional=True)
    exclude, include = patterns("exclude", exclude), patterns("include", include)
    overrides = patterns("overrides", overrides, pairs=True)
    if tokenizer is not None and not str(tokenizer):
        raise QronosError("tokenizer is an empty path; leave it out to use the one beside the "
                          "model")
    recipe, preset_format = build_recipe(preset, bits=bits, group_size=group_size,
                                         per_channel=per_channel, symmetric=symmetric, algo=algo,
                                         damping=damping, act_order=act_order, exclude=exclude,
                                         include=include, lm_head=lm_head, overrides=overrides)
    fmt = format if format is not None else preset_format or "matmulnbits"
    check_format(recipe, fmt)                       # all cheap checks before any data work
    if accuracy_level is not None and accuracy_level not in range(5):
        raise QronosError(f"accuracy_level must be 0..4, got {accuracy_level}")
    if not Path(model).is_file():
        raise QronosError(f"model file not found: {model}")
    report_names = [] if report is None else [report_name(Path(output), report)]
    check_output_path(output, [model], force, report_names)
    calibration = CalibrationOptions(reference=reference, device=device, progress=progress)
    needs_data = recipe.solver.algorithm != "rtn" or recipe.act_quant is not None
    if not needs_data and calib_data != WIKI_VITAL:
        given = (repr(str(calib_data)) if isinstance(calib_data, (str, os.PathLike))
                 else f"(a {type(calib_data).__name__})")
        warnings.warn("round-to-nearest without activation quantization reads no calibration "
                      f"data; calib_data {given} is not used", RecipeWarning, stacklevel=2)
    if damping is not None and algo in ("rtn", "gpfq"):
        warnings.warn(f"{algo} takes no damping; damping {damping} is not used", RecipeWarning,
                      stacklevel=2)
    if accuracy_level is not None and fmt != "matmulnbits":
        warnings.warn(f"accuracy_level is a MatMulNBits attribute; the {fmt} format does not "
                      "use it", RecipeWarning, stacklevel=2)
    with termination_as_interrupt(), output_lock(output):
        samples = (calibration_samples(model, calib_data, calib_windows, seqlen, tokenizer)
                   if needs_data else [])
        outcome = quantize_file(model, output, recipe, samples, calibration, force=force,
                                fmt=fmt, accuracy_level=accuracy_level, report=report,
                                tokenizer=tokenizer or default_tokenizer(model))
    return outcome.report


def check_context(model: str | os.PathLike, seqlen: int) -> None:
    """Warn when windows of ``seqlen`` tokens exceed the context the model was trained for,
    ``max_position_embeddings`` in the ``config.json`` beside it (transformers and Optimum
    exports write one). A model that computes its positions (rotary) runs at any length, but
    beyond its context its activations, and so calibration and perplexity, are not the ones of
    normal use."""
    config = Path(model).parent / "config.json"
    try:
        limit = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return                                   # no readable config: nothing to compare with
    if isinstance(limit, int) and seqlen > limit:
        warnings.warn(f"--seqlen {seqlen} is longer than the {limit} positions the model was "
                      f"trained for (max_position_embeddings in {config}); use --seqlen {limit} "
                      "or less", CalibrationWarning, stacklevel=3)


def calibration_samples(model, data, windows: int, seqlen: int, tokenizer) -> list[dict]:
    """Feed dicts for calibration from a text source or from ready feeds."""
    signature = detect_signature(load_model(model))
    if isinstance(data, (str, os.PathLike)):
        if windows < 1 or seqlen < 2:
            raise QronosError("calibration needs at least one window of two tokens")
        signature.check_seqlen(seqlen)
        check_context(model, seqlen)
        chosen = token_windows(data, tokenizer or default_tokenizer(model), seqlen, windows,
                               "train", random=True)
        signature.check_token_ids(chosen)
        return [signature.feed(w[None]) for w in chosen]
    samples = []
    for feed in feeds_from(data):
        if not isinstance(feed, dict):
            raise TypeError(f"calib_data must give feed dicts (input name -> array), got "
                            f"{feed!r} ({type(feed).__name__})")
        if signature.input_ids not in feed:
            raise QronosError(f"a calibration feed has no {signature.input_ids!r} input")
        ids = np.asarray(feed[signature.input_ids])
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise QronosError(f"a calibration feed's {signature.input_ids!r} must be integer "
                              f"token ids [batch, tokens] with at least one token, got "
                              f"{ids.dtype} {list(ids.shape)}")
        samples.append(signature.complete(feed))
    for sample in samples:
        signature.check_token_ids(sample[signature.input_ids], "a calibration feed")
    return samples


def evaluate(model: str | os.PathLike, *, reference: str | os.PathLike | None = None,
             data: str | os.PathLike = WIKI_VITAL, windows: int = DEFAULT_EVAL_WINDOWS,
             seqlen: int = DEFAULT_SEQLEN, tokenizer: str | os.PathLike | None = None,
             device: str = "auto", progress: bool = True) -> EvalResult:
    """Perplexity (and KL / top-1 agreement against ``reference``) on the first ``windows``
    windows of ``data`` (the test side of wiki-vital by default)."""
    check_path("model", model)
    check_path("reference", reference, optional=True)
    check_path("data", data)
    check_path("tokenizer", tokenizer, optional=True)
    check_int("windows", windows)
    check_int("seqlen", seqlen)
    if windows < 1 or seqlen < 2:
        raise QronosError("evaluation needs at least one window of two tokens")
    signatures = [detect_signature(load_model(path)) for path in (model, reference)
                  if path is not None]                 # clear errors for either model
    for path, signature in zip((model, reference), signatures):
        signature.check_seqlen(seqlen)
        check_context(path, seqlen)
    vocabs = {s.vocab for s in signatures}
    if None not in vocabs and len(vocabs) > 1:
        raise QronosError(f"the model has a vocabulary of {signatures[0].vocab} tokens and the "
                          f"reference model {signatures[1].vocab}: compare models that share one")
    chosen = token_windows(data, tokenizer or default_tokenizer(model), seqlen, windows,
                           "test", random=False)
    for signature in signatures:
        signature.check_token_ids(chosen)
    return evaluate_windows(model, chosen, reference, device, progress, signatures)
