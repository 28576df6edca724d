"""Helpers shared by the tests: calibration feeds, brute-force captures, statistics, and the
pass chain run on a model file (no lock, no report) for tests that read the solved file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from qronos_onnx.calibration.runner import CalibrationOptions
from qronos_onnx.ir.model_io import load_model, write_model
from qronos_onnx.passes.calibrate import CalibrateSolvePass
from qronos_onnx.pipeline import quantize_model
from qronos_onnx.scheme import Scheme

QUIET = CalibrationOptions(progress=False)


def padded_samples(signature, count=3, batch=2, seqlen=48, real=20, seed=1):
    """Calibration feeds of random windows, ``batch`` rows each, the last row right-padded
    (attention mask 0) after ``real`` tokens."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seqlen), np.int64)
    mask[-1, real:] = 0
    return [signature.feed(rng.integers(0, 256, (batch, seqlen)), mask) for _ in range(count)]


def random_samples(signature, count=3, seqlen=48, seed=0):
    """Calibration feeds of random token windows (batch 1)."""
    rng = np.random.default_rng(seed)
    return [signature.feed(rng.integers(0, 256, (1, seqlen))) for _ in range(count)]


def solve_file(
    model_path, output, recipe: Scheme, samples, calibration=None, fmt=None, observer=None
) -> tuple[Path, CalibrateSolvePass]:
    """Load ``model_path``, run the pass chain (``fmt=None``: fake-quantized float weights, for
    brute-force captures) and save it to ``output``; returns ``(output, solve pass)``."""
    model = load_model(model_path)
    solved = quantize_model(model, recipe, samples, calibration or QUIET, fmt, observer=observer)
    write_model(model, Path(output))
    return Path(output), solved


def full_model_capture(model_path, names, solved, samples):
    """Run the whole model (onnx + ORT, no project code) with ``names`` as extra outputs and
    the ``solved`` weights ({initializer: array}) substituted; returns {name: [arrays]}."""
    proto = onnx.load(str(model_path))
    for init in proto.graph.initializer:
        if init.name in solved:
            init.CopyFrom(numpy_helper.from_array(solved[init.name], init.name))
    for name in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {n: [] for n in names}
    for feed in samples:
        for n, a in zip(names, session.run(names, feed), strict=False):
            out[n].append(a)
    return out


def gram(a, b):
    """``A^T B / n`` of two lists of activations ``[..., d]`` (float64)."""
    a = np.concatenate([x.reshape(-1, x.shape[-1]) for x in a]).astype(np.float64)
    b = np.concatenate([x.reshape(-1, x.shape[-1]) for x in b]).astype(np.float64)
    return a.T @ b / a.shape[0]


def solved_weights(results):
    """{initializer: dequantized weight in the stored layout} of a list of results."""
    return {r.target.weight: r.weight.dequantize().numpy().T.copy() for r in results}


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def logits(path, feed):
    """The ``logits`` output of the model file at ``path`` (plain ONNX Runtime, CPU) for the
    feed's entries the model takes."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]
