"""``QronosQuantization``: an Olive pass that runs qronos-onnx on an ``ONNXModelHandler``.

Register it with the package config in ``passes/olive_config.json`` (merged with Olive's own by
``qronos-onnx olive-config``, since Olive's ``--package-config`` replaces its default registry).
Calibration data: an Olive ``data_config`` when given (its feeds are completed with the LLM
inputs they lack), else ``calib_data`` (a text file or ``wiki-vital``) cut into windows with the
tokenizer beside the model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Union

from olive.data.config import DataConfig
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, ir_model_to_olive_model
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from .. import api
from ..calibration.runner import CalibrationOptions
from ..defaults import DEFAULT_SEQLEN, DEFAULT_WINDOWS
from ..ir.model_io import load_model
from ..pipeline import check_format, quantize_model
from ..report import build_report, report_path, write_report


class QronosQuantization(Pass):
    """Quantize an ONNX decoder LLM with Qronos (or GPTQ, GPFQ, RTN) from qronos-onnx."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "preset": PassConfigParam(type_=str, default_value="w4", description=(
                "Recipe: w4, w3, w2, w4a4 (int4 per-token activations) or w8a8 (int8 weights and "
                "static uint8 activations, QDQ). The options below override it.")),
            "bits": PassConfigParam(type_=Optional[int], default_value=None,
                                    description="Weight bits (2..8); default from the preset."),
            "group_size": PassConfigParam(type_=Optional[int], default_value=None, description=(
                "Input features per scale; default from the preset.")),
            "per_channel": PassConfigParam(type_=bool, default_value=False,
                                           description="One scale per output channel."),
            "symmetric": PassConfigParam(type_=Optional[bool], default_value=None,
                                         description="Symmetric grid; default from the preset."),
            "algorithm": PassConfigParam(type_=str, default_value="qronos",
                                         description="qronos, gptq, gpfq or rtn."),
            "format": PassConfigParam(type_=Optional[str], default_value=None, description=(
                "matmulnbits (com.microsoft.MatMulNBits) or qdq (opset-21 DequantizeLinear); "
                "default from the preset.")),
            "accuracy_level": PassConfigParam(type_=Optional[int], default_value=None,
                                              description="MatMulNBits accuracy_level (0-4)."),
            "exclude": PassConfigParam(type_=list, default_value=[], description=(
                "Layers left in float: globs, or re:REGEX, on module paths and node names.")),
            "include": PassConfigParam(type_=list, default_value=[],
                                       description="Quantize only these layers."),
            "lm_head": PassConfigParam(type_=str, default_value="skip",
                                       description="skip (default) or int8."),
            "overrides": PassConfigParam(type_=list, default_value=[], description=(
                "Per-layer grids: PATTERN=bits:N,group:N|channel,sym|asym strings.")),
            "damping": PassConfigParam(type_=Optional[float], default_value=None,
                                       description="Relative damping; default per algorithm."),
            "calib_data": PassConfigParam(type_=str, default_value="wiki-vital", description=(
                "Text file or wiki-vital, when no data_config is given.")),
            "calib_windows": PassConfigParam(type_=int, default_value=DEFAULT_WINDOWS,
                                             description="Calibration windows."),
            "seqlen": PassConfigParam(type_=int, default_value=DEFAULT_SEQLEN,
                                      description="Tokens per calibration window."),
            "tokenizer": PassConfigParam(type_=Optional[str], default_value=None, description=(
                "tokenizer.json or directory; default: beside the input model.")),
            "data_config": PassConfigParam(type_=Optional[Union[DataConfig, dict]],
                                           default_value=None, description=(
                "Olive data config for calibration (used instead of calib_data).")),
            "device": PassConfigParam(type_=str, default_value="auto",
                                      description="auto, cpu or cuda."),
            **get_external_data_config(),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        t0 = time.perf_counter()
        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        recipe, preset_format = api.build_recipe(
            config.preset, bits=config.bits, group_size=config.group_size,
            per_channel=config.per_channel, symmetric=config.symmetric, algo=config.algorithm,
            damping=config.damping, exclude=config.exclude, include=config.include,
            lm_head=config.lm_head, overrides=config.overrides)
        fmt = config.format or preset_format or "matmulnbits"
        notes = check_format(recipe, fmt)
        samples = api.calibration_samples(model.model_path, self._calibration_data(model, config),
                                          config.calib_windows, config.seqlen, config.tokenizer)
        ir_model = load_model(model.model_path)
        quantize = quantize_model(ir_model, recipe, samples, CalibrationOptions(device=config.device),
                                  fmt, config.accuracy_level)
        handler = ir_model_to_olive_model(ir_model, output_model_path, config)
        output = Path(output_model_path)
        files = [output, *(p for p in output.parent.glob(output.name + "*") if p != output)]
        report = build_report(model.model_path, output, files, quantize, fmt, notes,
                              time.perf_counter() - t0)
        write_report(report, report_path(output))
        return handler

    @staticmethod
    def _calibration_data(model: ONNXModelHandler, config) -> Any:
        if config.data_config is None:
            return config.calib_data
        data_config = config.data_config
        if isinstance(data_config, dict):
            data_config = DataConfig(**data_config)
        return data_config.to_data_container().create_calibration_dataloader(
            model_path=model.model_path, io_config=model.io_config)
