"""ONNX Runtime sessions on the best available execution provider."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from qronos_onnx.errors import QronosError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: ONNX Runtime's log severity for our sessions and runs: fatal only. Its errors reach the user
#: as our one-line ``QronosError`` (``make_session``, ``run_session``), not as its own log lines.
_LOG_FATAL = 4

#: The exceptions ONNX Runtime raises (its pybind module's error classes).
_ORT_ERRORS = tuple(
    v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception)
)


def providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device``: CUDA (then CPU) when ``onnxruntime-gpu`` offers it
    and ``device`` is ``auto`` or ``cuda``, else CPU."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise QronosError(
                "device cuda needs onnxruntime-gpu (pip install 'qronos-onnx[gpu]' "
                "in an environment without onnxruntime)"
            )
        return [CUDA, CPU]
    if device != "auto":
        raise QronosError(f"device must be auto, cpu or cuda, got {device!r}")
    return [CUDA, CPU] if CUDA in available else [CPU]


def require_runnable_dtype(model: ir.Model, device: str = "auto") -> None:
    """Refuse a bfloat16 model when the run has only ONNX Runtime's CPU provider, which has
    no bfloat16 kernels (MatMul, Add, Mul, Sigmoid, ReduceMax: NOT_IMPLEMENTED in 1.32): the
    calibration could not run it, nor could the quantized model run there.

    Raises:
        QronosError: naming the way out (CUDA, or a float16/float32 export).
    """
    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    if CUDA in providers(device) or not any(v.dtype == ir.DataType.BFLOAT16 for v in values):
        return
    raise QronosError(
        "the model computes in bfloat16, which ONNX Runtime's CPU provider cannot run: "
        "quantize it with onnxruntime-gpu and --device cuda, or export it in float16 or "
        "float32 (qronos-onnx export --dtype fp16)"
    )


def make_session(
    model: onnx.ModelProto | str,
    device: str = "auto",
    optimize: bool = True,
    profile_prefix: str | None = None,
    what: str = "the model",
    external_data_dir: str | os.PathLike | None = None,
) -> ort.InferenceSession:
    """A session for an in-memory model (or a model path).

    ``optimize=False`` keeps every node as it is (no fusions), so that node-level profiling
    names the graph's own nodes. ``what`` names the model in errors. ``external_data_dir``: the
    folder an in-memory model's external data locations are relative to.

    Raises:
        QronosError: ONNX Runtime cannot load the graph (an operator it does not know, a type
            error, a provider that fails to start).
    """
    options = ort.SessionOptions()
    options.log_severity_level = _LOG_FATAL
    # Many short runs interleave with torch work on the same cores: idle ORT threads must
    # sleep, not spin, or they steal the cores torch needs between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if external_data_dir is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_data_dir)
        )
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=providers(device))
    except _ORT_ERRORS as err:
        raise QronosError(f"ONNX Runtime cannot load {what}: {_last_line(err)}") from err
    if device == "cuda" and CUDA not in session.get_providers():
        raise QronosError("device cuda: ONNX Runtime could not start its CUDA provider")
    return session


def run_session(
    session: ort.InferenceSession, outputs: list[str], feeds: dict[str, np.ndarray], what: str
) -> list[np.ndarray]:
    """``session.run(outputs, feeds)``; an ONNX Runtime failure becomes a ``QronosError``
    (``ort_errors_as_qronos``)."""
    run_options = ort.RunOptions()
    run_options.log_severity_level = _LOG_FATAL
    with ort_errors_as_qronos(what, feeds):
        return session.run(outputs, feeds, run_options)


@contextlib.contextmanager
def ort_errors_as_qronos(what: str, feeds: Mapping[str, np.ndarray]) -> Iterator[None]:
    """An ONNX Runtime failure in the block becomes a ``QronosError`` that names ``what`` was
    running and the feed shapes (a window longer than the model supports and a lack of memory
    both end here)."""
    try:
        yield
    except _ORT_ERRORS as err:
        shapes = ", ".join(
            f"{k} {list(np.shape(v))}"
            for k, v in feeds.items()
            if k in ("input_ids", "attention_mask", "position_ids")
        )
        raise QronosError(
            f"ONNX Runtime failed on {what} ({shapes}): {_last_line(err)}. If the "
            "windows are longer than the model supports or memory ran out, use a "
            "shorter seqlen"
        ) from err


def _last_line(err: Exception) -> str:
    """The last line of an ONNX Runtime message (the reason; earlier lines are context)."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__
