"""The JSON report (``OUT.report.json``): what was quantized, how, how well, and at what cost."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
from pathlib import Path

from .defaults import DEFAULT_REPORT
from .errors import QronosError
from .ir.model_io import model_files
from .passes.quantize import QuantizePass, TargetResult


def _target_entry(r: TargetResult) -> dict:
    t, q = r.target, r.weight
    return {
        "name": t.name,
        "node": t.node,
        "shape": [t.out_features, t.in_features],
        "grid": dataclasses.asdict(q.grid),
        "algorithm": q.info.algorithm,
        "act_order": q.info.act_order,
        "damping": q.info.damping,
        "damping_retries": q.info.retries,
        "fell_back_to_rtn": q.info.fell_back_to_rtn,
        "dead_columns": q.info.dead_columns,
        "error_rtn": r.error_rtn,
        "error": r.error,
        "solve_seconds": round(r.seconds, 4),
    }


def _files_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).exists())


def build_report(model_path, output, files, quantize: QuantizePass, fmt: str | None,
                 notes: list[str], wall_seconds: float) -> dict:
    """The report of one quantization run (see the README for the meaning of each field).

    ``output`` is the output model's final path, ``files`` the files written for it so far
    (possibly still under a temporary name): their sizes make ``output_bytes``."""
    model_path = Path(model_path)
    inputs = model_files(model_path)
    run = quantize.run_info
    results = quantize.results
    return {
        "model": str(model_path),
        "output": str(output),
        "format": fmt or "float (fake-quantized)",
        "recipe": json.loads(json.dumps(dataclasses.asdict(quantize.recipe), default=str)),
        "calibration": {
            "samples": len(quantize.samples),
            "reference": quantize.calibration.reference,
            "stages": run.stages,
            "session_runs": run.session_runs,
            "providers": run.providers,
            "seconds": {k: round(v, 2) for k, v in run.seconds.items()},
        },
        "targets": [_target_entry(r) for r in results],
        "skipped": [dataclasses.asdict(s) for s in quantize.skipped],
        "notes": notes,
        "warnings": list(quantize.warnings),
        "totals": {
            "targets": len(results),
            "quantized_parameters": sum(r.target.in_features * r.target.out_features
                                        for r in results),
            "input_bytes": _files_bytes(inputs),
            "output_bytes": _files_bytes(files),
            "wall_seconds": round(wall_seconds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
    }


def report_name(output: Path, name: str = DEFAULT_REPORT) -> str:
    """The report's file name for ``output``: ``name`` with ``{stem}`` replaced by the output's
    name without ``.onnx`` (nothing else is substituted)."""
    filled = name.replace("{stem}", output.stem)
    if "{" in filled or "}" in filled:
        raise QronosError(f"report name {name!r}: only {{stem}} may be used in braces")
    return filled


def report_path(output: Path, name: str = DEFAULT_REPORT) -> Path:
    """Where the report of ``output`` goes (``check_output_path`` has vetted the name)."""
    return output.with_name(report_name(output, name))


def write_report(report: dict, path: Path) -> Path:
    """Write ``report`` as JSON to ``path`` (through a temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
