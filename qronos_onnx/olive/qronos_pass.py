"""``QronosQuantization``: an Olive pass that runs qronos-onnx on an ``ONNXModelHandler``.

A thin adapter over ``pipeline.run``: its parameters are the fields of ``Options``
(generated here), plus ``recipe`` (a preset name or a recipe file, default ``w4``) and an Olive
``data_config`` for calibration (its feeds are completed with the LLM inputs they lack, such as
``position_ids`` and an empty KV cache). A parameter left ``null`` keeps the recipe's value.
Register the pass with the package config in ``passes/olive_config.json`` (merged with Olive's
own by ``qronos-onnx olive-config``, since Olive's ``--package-config`` replaces its default
registry).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Union

import onnx_ir as ir
from olive.data.config import DataConfig
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam
from olive.resource_path import LocalFolder

from qronos_onnx.api import resolve
from qronos_onnx.formats.base import Format
from qronos_onnx.options import DEFAULT_PRESET, DEFAULT_REPORT, Options
from qronos_onnx.pipeline import ReportMaker, run
from qronos_onnx.registry import get_format
from qronos_onnx.report import Report
from qronos_onnx.schema import alternatives, fields, hints, meta
from qronos_onnx.writers import FileWriter


def _olive_type(name: str) -> Any:
    """The parameter type Olive validates: the field's type made optional (``None`` keeps
    the recipe's value), choices as strings and tuples of patterns as lists."""
    tp = hints(Options)[name]
    if typing.get_origin(tp) is tuple:
        return list | None
    kinds = {str if typing.get_origin(a) is typing.Literal else a for a in alternatives(tp)}
    members = (*sorted(kinds - {type(None)}, key=str), type(None))
    return Union[members]  # noqa: UP007 (a Union built at run time from a tuple of types)


class _OliveWriter(FileWriter):
    """The command line's writer (model and data, report, tokenizer files, and the
    ``genai_config.json`` of an input from Olive's ``ModelBuilder``) into Olive's output
    directory, and the handler Olive passes on: the input's model attributes, with the files
    written beside the model as ``additional_files`` (how Olive carries them)."""

    def __init__(self, output: Path, fmt: Format, attributes: dict[str, Any] | None):
        super().__init__(output, force=True, report=DEFAULT_REPORT, fmt=fmt)
        self.attributes = dict(attributes or {})
        self.handler: ONNXModelHandler | None = None

    def write(self, model: ir.Model, make_report: ReportMaker) -> Report:
        report = super().write(model, make_report)
        own = set(self.format.files(self.output))
        extra = sorted(str(p) for p in self.placed if p.name not in own)
        self.attributes["additional_files"] = extra
        self.handler = ONNXModelHandler(
            model_path=LocalFolder({"path": self.output.parent}),
            onnx_file_name=self.output.name,
            model_attributes=self.attributes,
        )
        return report


class QronosQuantization(Pass):
    """Quantize an ONNX decoder LLM with Qronos (or GPTQ, GPFQ, RTN) from qronos-onnx."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        params = {
            "recipe": PassConfigParam(
                type_=str | None,
                default_value=None,
                description=(
                    f"A preset (w4, w3, w2, w4a4, w8a8) or a recipe file; default "
                    f"{DEFAULT_PRESET}. The parameters below override it."
                ),
            ),
            "data_config": PassConfigParam(
                type_=DataConfig | dict | None,
                default_value=None,
                description="Olive data config for calibration (used instead of calib_data).",
            ),
        }
        for f in fields(Options):
            if meta(f).olive:
                params[f.name] = PassConfigParam(
                    type_=_olive_type(f.name),
                    default_value=None,
                    description=f"{meta(f).help} (null: the recipe's value; default {f.default!r})",
                )
        return params

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        overrides = {
            f.name: getattr(config, f.name)
            for f in fields(Options)
            if meta(f).olive and getattr(config, f.name) is not None
        }
        settings = resolve(config.recipe, progress=False, **overrides)
        writer = _OliveWriter(output, get_format(settings.format), model.model_attributes)
        run(model.model_path, settings, writer, self._calibration_feeds(model, config))
        return writer.handler

    @staticmethod
    def _calibration_feeds(model: ONNXModelHandler, config) -> Any:
        if config.data_config is None:
            return None
        data_config = config.data_config
        if isinstance(data_config, dict):
            data_config = DataConfig(**data_config)
        return data_config.to_data_container().create_calibration_dataloader(
            model_path=model.model_path, io_config=model.io_config
        )
