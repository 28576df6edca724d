"""From a local Hugging Face checkpoint to a float ONNX model directory, ready for ``optimize``
and for ONNX Runtime GenAI.

Two exporters:

- ``genai`` (the default when it applies): ONNX Runtime GenAI's model builder
  (``python -m onnxruntime_genai.models.builder``, the ``genai`` extra). Its graphs are the ones
  ONNX Runtime ships for LLMs (GroupQueryAttention with the rotary embedding inside, fused
  norms, a fused QKV projection) and it writes ``genai_config.json`` and the tokenizer files.
  It runs float32 on CPU (its float16 CPU graphs fail when decoding, measured with
  onnxruntime-genai 0.18) and only the architectures it knows.
- ``torch``: ``torch.onnx.export`` (dynamo) of the transformers model
  (``export.torch_export``), for what the builder does not cover; a ``genai_config.json`` and
  the tokenizer files are written beside it.

Nothing is downloaded: the checkpoint is a local directory (``config.json`` and weights).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from qronos_onnx.errors import QronosError

Backend = Literal["auto", "genai", "torch"]
DTYPES = ("fp32", "fp16")
MODEL_FILE = "model.onnx"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint directory (a ``config.json`` with a
    ``model_type``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def builder_available() -> bool:
    """Whether ONNX Runtime GenAI's model builder can be imported here."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    backend: Backend = "auto",
) -> tuple[Path, str]:
    """Export ``checkpoint`` into ``out_dir`` (created; it must not hold a model yet) and
    return ``(model path, exporter used)``.

    ``auto`` uses the GenAI builder when it is installed and the dtype is float32, and
    ``torch.onnx`` otherwise or when the builder refuses the architecture.

    Raises:
        QronosError: not a checkpoint, a bad dtype or backend, an output that exists, or an
            exporter failure (the message quotes its last line).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not is_checkpoint(checkpoint):
        raise QronosError(
            f"{checkpoint} is not a Hugging Face checkpoint directory (no "
            "config.json with a model_type)"
        )
    if dtype not in DTYPES:
        raise QronosError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if backend not in ("auto", "genai", "torch"):
        raise QronosError(f"backend must be auto, genai or torch, got {backend!r}")
    if (out_dir / MODEL_FILE).exists():
        raise QronosError(f"{out_dir / MODEL_FILE} exists; export into a new directory")
    if backend == "genai" and not builder_available():
        raise QronosError(
            "the GenAI model builder is not installed: pip install "
            "'qronos-onnx[genai]' (or [genai-gpu] with onnxruntime-gpu)"
        )
    use_builder = backend == "genai" or (
        backend == "auto" and dtype == "fp32" and builder_available()
    )
    with _staging(out_dir) as tmp:
        used = "genai"
        if use_builder:
            try:
                run_builder(checkpoint, tmp, dtype)
            except _Unsupported as err:
                if backend == "genai":
                    raise QronosError(
                        f"the GenAI model builder does not support {checkpoint}: {err}"
                    ) from err
                used = "torch"
        if not use_builder or used == "torch":
            used = "torch"
            _run_torch(checkpoint, tmp, dtype)
    return out_dir / MODEL_FILE, used


class _Unsupported(Exception):
    """The builder refused the checkpoint's architecture."""


def run_builder(checkpoint: Path, out: Path, precision: str, extra_options: str = "") -> None:
    """ONNX Runtime GenAI's builder, in a child process, offline: ``-p precision`` (``fp32``,
    ``fp16``, ``int4``) for the CPU, with ``--extra_options`` when given."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as cache:
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(checkpoint),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            cache,
        ]
        if extra_options:
            cmd += ["--extra_options", extra_options]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        if "not currently supported" in done.stderr or "NotImplementedError" in done.stderr:
            raise _Unsupported(last)
        raise QronosError(f"the GenAI model builder failed on {checkpoint}: {last}")
    if not (out / MODEL_FILE).is_file():
        raise QronosError(f"the GenAI model builder wrote no {MODEL_FILE} for {checkpoint}")


def _run_torch(checkpoint: Path, out: Path, dtype: str) -> None:
    """``torch.onnx`` of the transformers model, with its tokenizer files and a
    ``genai_config.json``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from qronos_onnx.genai import GENAI_CONFIG, TOKENIZER_FILES, write_config_for
    from qronos_onnx.ir.model_io import load_model
    from qronos_onnx.ir.signature import detect_signature

    from .torch_export import export_causal_lm

    hf_logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notices about torchvision ops
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=torch.float16 if dtype == "fp16" else torch.float32
        )
    except Exception as err:  # transformers raises many types for unloadable checkpoints
        raise QronosError(
            f"transformers cannot load {checkpoint}: {' '.join(str(err).split())}"
        ) from err
    export_causal_lm(model, out / MODEL_FILE)
    for name in (*TOKENIZER_FILES, "config.json", "generation_config.json"):
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    onnx_model = load_model(out / MODEL_FILE)
    config = write_config_for(
        onnx_model, detect_signature(onnx_model), out / MODEL_FILE, MODEL_FILE
    )
    (out / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A staging directory beside ``out_dir`` whose files are moved into it (created) when
    the block completes; on failure nothing stays."""
    from qronos_onnx.staging import output_lock, staged_output, termination_as_interrupt

    with termination_as_interrupt(), output_lock(out_dir / MODEL_FILE):  # creates out_dir
        tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out_dir))
        try:
            yield tmp
            names = sorted(p.name for p in tmp.iterdir() if p.name != MODEL_FILE)
            with staged_output(out_dir / MODEL_FILE, [*names, MODEL_FILE]) as staged:
                for name in [*names, MODEL_FILE]:
                    os.replace(tmp / name, staged / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
