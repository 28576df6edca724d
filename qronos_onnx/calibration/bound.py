"""Stage runs through ONNX Runtime's I/O binding, for a GPU: weights stay on the device.

A plain ``session.run`` takes host arrays and returns host arrays: on CUDA every window would
copy the stage's weights to the device (a Llama-3-8B layer is 0.9 GB in float32, twice per
window) and every output back. ``BoundRun`` binds a stage's constants once, as OrtValues on
the session's device, binds each window's activations (copied in by ONNX Runtime), leaves the
outputs on the device, and hands the ones the statistics read to torch through DLPack, without
a copy; the others (values kept between stages, measured layer outputs) come back to host
numpy. The same code runs on CPU (the device is then ``cpu``), which is how it is tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnxruntime as ort
import torch

from .session import CUDA, ort_errors_as_qronos


class BoundRun:
    """One stage session run with I/O binding on its device.

    Args:
        session: the stage's session.
    """

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.device = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        self._constants: dict[str, dict[str, ort.OrtValue]] = {}

    def bind_constants(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Place ``arrays`` (a stream's weights and large constants) on the device once, under
        ``key`` (``float`` / ``quant``); each run of that stream binds them."""
        self._constants[key] = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)
            for name, a in arrays.items()
        }

    def run(
        self,
        key: str,
        outputs: list[str],
        feeds: Mapping[str, np.ndarray],
        on_device: Iterable[str],
        what: str,
    ) -> dict[str, np.ndarray | torch.Tensor]:
        """Run with ``feeds`` (host arrays) and the constants bound under ``key``; returns
        ``outputs``: those in ``on_device`` as torch tensors on the device (shared with ONNX
        Runtime's buffers through DLPack), the others as host numpy arrays."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in self._constants[key].items():
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.device)
        with ort_errors_as_qronos(what, feeds):
            self.session.run_with_iobinding(binding)
            values = binding.get_outputs()
        keep = set(on_device)
        return {
            name: torch.from_dlpack(value) if name in keep else value.numpy()
            for name, value in zip(outputs, values, strict=True)
        }
