"""ONNX Runtime GenAI's model builder (``python -m onnxruntime_genai.models.builder``, the
``genai`` extra), run in a child process, offline. Its graphs are the ones ONNX Runtime ships
for LLMs (GroupQueryAttention with the rotary embedding inside, fused norms, a fused QKV
projection) and it writes ``genai_config.json`` and the tokenizer files. It runs float32 on
CPU (its float16 CPU graphs fail when decoding, measured with onnxruntime-genai 0.18) and only
the architectures and checkpoints it knows."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qronos_onnx.errors import QronosError

MODEL_FILE = "model.onnx"


class BuilderFailed(QronosError):
    """The builder refused the checkpoint or failed on it (the message quotes its last line)."""


def builder_available() -> bool:
    """Whether ONNX Runtime GenAI's model builder can be imported here."""
    return importlib.util.find_spec("onnxruntime_genai") is not None


def run_builder(checkpoint: Path, out: Path, precision: str, extra_options: str = "") -> None:
    """The builder on ``checkpoint`` into ``out``: ``-p precision`` (``fp32``, ``fp16``,
    ``int4``) for the CPU, with ``--extra_options`` when given.

    Raises:
        BuilderFailed: it exited with an error, or wrote no model.
    """
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
        raise BuilderFailed(f"the GenAI model builder failed on {checkpoint}: {last}")
    if not (out / MODEL_FILE).is_file():
        raise BuilderFailed(f"the GenAI model builder wrote no {MODEL_FILE} for {checkpoint}")
