"""Where ``pipeline.run`` puts its result: ``FileWriter`` writes the output model and the
files its format declares, the report, the tokenizer files and (for ONNX Runtime GenAI)
``genai_config.json`` beside ``OUT.onnx``, all or nothing (``files.placement``), holding the
output's lock for the run (``files.lock``)."""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from .errors import QronosError
from .files.lock import lock_path, output_lock
from .files.paths import check_output_place, refuse_existing
from .files.placement import recover, staged_output, staging_folder
from .files.signals import termination_as_interrupt
from .formats.base import Format
from .genai import (
    GENAI_CONFIG,
    for_output,
    minimal_tokenizer_config,
    read_genai_config,
    tokenizer_sources,
    write_config_for,
)
from .ir.model_io import TOKENIZER_FILE, model_files
from .ir.signature import detect_signature
from .options import Options
from .pipeline import ReportMaker
from .registry import get_format
from .report import Report, report_name


class FileWriter:
    """Writes ``OUT.onnx`` and its companions beside it, all or nothing.

    Companions: the files the format declares (``OUT.onnx.data``); the report (when named);
    the tokenizer files (those of ``tokenizer``, or found beside the input model or in the
    folder above it) when the output's folder has none, an existing one that differs being
    kept with a warning; and ``genai_config.json``, naming ``OUT.onnx``, when the input
    model's folder has one (a model from GenAI's model builder) or ``genai_config`` asks for
    it.

    Args:
        output: the output model's path.
        force: replace existing outputs.
        report: the report's file name (``{stem}`` = the output's name without ``.onnx``), or
            ``None`` for none.
        tokenizer: a ``tokenizer.json`` or a tokenizer directory; ``None``: find it.
        genai_config: write a ``genai_config.json`` even when the input has none.
        fmt: the output format (its files and how they are saved); default: the default
            format option's.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        force: bool = False,
        report: str | None = None,
        tokenizer: str | os.PathLike | None = None,
        genai_config: bool = False,
        fmt: Format | None = None,
    ):
        self.output = Path(output)
        self.format = fmt or get_format(Options().format)
        self.force = force
        self.report = None if report is None else report_name(self.output, report)
        self.tokenizer = None if tokenizer is None else Path(tokenizer)
        self.genai_config = genai_config
        self.model_path: Path | None = None
        self.input_genai: dict | None = None
        self.placed: list[Path] = []  # the files written, once placed
        self.scratch: Path | None = None  # the run's staging folder, while reserved

    @property
    def writes_genai_config(self) -> bool:
        return self.genai_config or self.input_genai is not None

    def _names(self) -> list[str]:
        """The files a run may write beside the output (the model's last)."""
        model = self.format.files(self.output)
        companions = [] if self.report is None else [self.report]
        if self.writes_genai_config:
            companions.append(GENAI_CONFIG)
        return [*model[:-1], *companions, model[-1]]

    def check(self, model_path: Path | None) -> None:
        if self.output.suffix != self.format.suffix:
            raise QronosError(
                f"output must end in {self.format.suffix} ({self.format.name} format), got "
                f"{self.output}"
            )
        if self.report is not None:
            _check_report_name(self.report, self.output, self.format.files(self.output))
        read: dict[Path, str] = {}
        if model_path is not None:
            self.model_path = model_path
            self.input_genai = read_genai_config(model_path.parent)
            if (
                self.writes_genai_config
                and self.output.parent.resolve() == model_path.parent.resolve()
                and self.input_genai is not None
            ):
                raise QronosError(
                    f"the output would replace the {GENAI_CONFIG} of the input "
                    f"model in {model_path.parent}; write it into another folder "
                    "(it gets a genai_config.json of its own)"
                )
            read = {path: str(model_path) for path in model_files(model_path)}
        names = [*self._names(), lock_path(self.output).name]
        check_output_place(self.output, names, read)

    @contextlib.contextmanager
    def reserve(self) -> Iterator[None]:
        """The output's lock, held for the run: first a killed run's leftovers are repaired
        (whatever ``force`` says), then outputs that exist are refused without ``force``."""
        with termination_as_interrupt(), output_lock(self.output, repair=recover):
            refuse_existing(self.output, self._names(), self.force)
            with staging_folder(self.output) as self.scratch:
                try:
                    yield
                finally:
                    self.scratch = None

    def write(self, model: ir.Model, make_report: ReportMaker) -> Report:
        output = self.output
        texts = self._texts(model)
        copies = self._tokenizer_copies()
        if (
            self.writes_genai_config
            and "tokenizer_config.json" not in copies
            and not (output.parent / "tokenizer_config.json").exists()
            and copies
        ):
            texts["tokenizer_config.json"] = minimal_tokenizer_config()
        own = self.format.files(output)
        names = [
            *own[:-1],
            *([] if self.report is None else [self.report]),
            *copies,
            *texts,
            own[-1],
        ]
        with staged_output(output, names, self.force, self.scratch) as staged:
            written = self.format.save(model, staged / output.name)
            for name, source in copies.items():
                written.append(Path(shutil.copyfile(source, staged / name)))
            for name, text in texts.items():
                (staged / name).write_text(text, encoding="utf-8")
                written.append(staged / name)
            report = make_report(written)
            if self.report is not None:
                written.append(report.write(staged / self.report))
        self.placed = [output.parent / p.name for p in written]
        return report

    def _texts(self, model: ir.Model) -> dict[str, str]:
        """Text companions: ``genai_config.json``."""
        if not self.writes_genai_config:
            return {}
        assert self.model_path is not None  # set by check(), which run() calls first
        if self.input_genai is not None:
            config = for_output(self.input_genai, self.output.name)
        else:
            config = write_config_for(
                model, detect_signature(model), self.model_path, self.output.name
            )
        return {GENAI_CONFIG: json.dumps(config, indent=4) + "\n"}

    def _tokenizer_copies(self) -> dict[str, Path]:
        """The tokenizer files to copy: those not in the output's folder yet. One that is
        there and differs is kept, with a warning (the model is evaluated and deployed with
        the tokenizer beside it)."""
        assert self.model_path is not None
        sources = tokenizer_sources(self.model_path, self.tokenizer)
        copies = {}
        for name, source in sources.items():
            target = self.output.parent / name
            if not target.exists():
                copies[name] = source
            elif not filecmp.cmp(source, target, shallow=False):
                warnings.warn(
                    f"{target} differs from {source} and was kept; replace it if it "
                    "is not the model's tokenizer",
                    UserWarning,
                    stacklevel=3,
                )
        return copies


def default_file_writer(output: str | os.PathLike, options: Options) -> FileWriter:
    """The writer of the command line and the Python API."""
    return FileWriter(
        output,
        options.force,
        options.report,
        options.tokenizer,
        options.genai_config,
        get_format(options.format),
    )


def _check_report_name(name: str, output: Path, own: list[str]) -> None:
    """The report's name is a plain file name beside the output, none of the run's others."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise QronosError(f"{name!r} is not a plain file name for beside the output")
    if name.endswith(".onnx") or name == TOKENIZER_FILE or name == lock_path(output).name:
        raise QronosError(
            f"{name!r} cannot name a file beside the output: *.onnx names models, "
            f"{TOKENIZER_FILE} the tokenizer copied there and {lock_path(output).name} the "
            "run's lock"
        )
    if name in own:
        raise QronosError(f"{name!r} is the output model's own file name")
