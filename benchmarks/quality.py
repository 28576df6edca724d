"""Quality of RTN, GPTQ, GPFQ, Qronos and ONNX Runtime's own quantizer on SmolLM2-135M.

    python benchmarks/quality.py [--only SETTING ...] [--methods METHOD ...] [--fresh]
                                 [--cache FILE]

The README's evaluation protocol: perplexity on the first 40 windows of 512 tokens of the test side
of wiki-vital; calibration on 32 windows of 512 tokens of the train side (ONNX Runtime's GPTQ on
8, see below). Every row runs in its own process (its peak RSS is its own) and is cached in
``benchmarks/quality.json`` as soon as it is measured, so an interrupted run resumes where it
stopped (``--fresh`` starts over). The table printed at the end goes to RESULTS.md.

Rows per setting: RTN, GPTQ, GPFQ and Qronos (this tool, MatMulNBits); ONNX Runtime's
``matmul_nbits_quantizer`` default (RTN) where its bits are supported (2, 4, 8), and its GPTQ at
4 bits, the only width it supports (a failure is recorded as the row). ONNX Runtime's GPTQ re-runs
the whole model once per activation name (about 20 minutes for 8 windows here), so it gets 8
calibration windows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m" / "model.onnx"
CACHE = Path(__file__).with_name("quality.json")
WORK = ROOT / "models" / "smollm2-135m-bench"

#: name -> optimize() options. The weight-only settings of round 1, then the settings of the
#: rotations (``rotate="hadamard"``: R1, R2 and the online R4) and the activation presets.
SETTINGS: dict[str, dict] = {
    "W4 g64 asym": {"bits": 4, "group_size": 64},
    "W4 g128 sym": {"bits": 4, "group_size": 128, "symmetric": True},
    "W4 per-channel asym": {"bits": 4, "group_size": "channel"},
    "W3 g64 asym": {"bits": 3, "group_size": 64},
    "W2 g32 asym": {"bits": 2, "group_size": 32},
    "W4A4, no rotation, no clip": {"config": "w4a4", "rotate": "none", "act_clip": 1.0},
    "W4A4 + rotations, no clip": {"config": "w4a4", "act_clip": 1.0},
    "W4A4 (--w4a4 without rotations)": {"config": "w4a4", "rotate": "none"},
    "W4A4 + rotations (--w4a4)": {"config": "w4a4"},
    "W4 g64 asym + rotations": {"bits": 4, "group_size": 64, "rotate": "hadamard"},
    "W3 g64 asym + rotations": {"bits": 3, "group_size": 64, "rotate": "hadamard"},
    "W2 g32 asym + rotations": {"bits": 2, "group_size": 32, "rotate": "hadamard"},
    "W2 g32 asym + rotations + MagR 1e-3": {
        "bits": 2,
        "group_size": 32,
        "rotate": "hadamard",
        "magr": 1e-3,
    },
    "W2 g32 asym + rotations + MagR 1e-4": {
        "bits": 2,
        "group_size": 32,
        "rotate": "hadamard",
        "magr": 1e-4,
    },
    "W2 g32 asym + MagR 1e-4 (no rotation)": {"bits": 2, "group_size": 32, "magr": 1e-4},
    "W8A8 without rotations": {"config": "w8a8", "rotate": "none"},
    "W8A8 + rotations (--w8a8)": {"config": "w8a8"},
    "--w4 (the default preset)": {"config": "w4"},
}
#: Settings measured with GPFQ and ONNX Runtime's quantizer too (weight-only, no rotation).
ROUND_1 = ("W4 g64 asym", "W4 g128 sym", "W4 per-channel asym", "W3 g64 asym", "W2 g32 asym")
#: Settings measured with Qronos only (the others' rows would repeat the weight-only story).
QRONOS_ONLY = (
    "W4A4, no rotation, no clip",
    "W4A4 + rotations, no clip",
    "W2 g32 asym + rotations + MagR 1e-3",
    "W2 g32 asym + MagR 1e-4 (no rotation)",
    "W8A8 without rotations",
    "W8A8 + rotations (--w8a8)",
    "--w4 (the default preset)",
)
OURS = ("rtn", "gptq", "gpfq", "qronos")
ORT_WINDOWS = 8


def rows_for(setting: str) -> list[str]:
    if setting in QRONOS_ONLY:
        return ["qronos"]
    if setting not in ROUND_1:
        return ["rtn", "gptq", "qronos"]
    options = SETTINGS[setting]
    rows = list(OURS)
    if options["bits"] in (2, 4, 8):
        rows.append("ort-rtn")
    if options["bits"] == 4:
        rows.append("ort-gptq")
    return rows


def run_one(setting: str, method: str) -> dict:
    """Quantize (unless float) and evaluate; returns the measured row."""
    from qronos_onnx.calibration.data import token_windows
    from qronos_onnx.eval import evaluate_windows

    out = WORK / f"{setting.replace(' ', '_')}_{method}" / "model.onnx"
    t0 = time.perf_counter()
    extra: dict[str, float] = {}
    if method == "float":
        path, seconds = MODEL, 0.0
    else:
        if method.startswith("ort-"):
            ort_quantize(setting, method, out)
        else:
            import qronos_onnx

            report = qronos_onnx.optimize(
                MODEL, out, **SETTINGS[setting], algo=method, force=True, progress=False
            )
            if report.rotation is not None:
                extra["rotation_check_error"] = report.rotation.check["error"]
        path, seconds = out, time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    windows = token_windows("wiki-vital", MODEL.parent, 512, 40, "test", random=False)
    result = evaluate_windows(path, windows, progress=False)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {
        "perplexity": result.perplexity,
        "seconds": seconds,
        "peak_rss_mb": rss,
        "size_mb": size / 1e6,
        **extra,
    }


def ort_quantize(setting: str, method: str, out: Path) -> None:
    """ONNX Runtime's own weight-only quantizer (onnxruntime.quantization)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from qronos_onnx.calibration.data import calibration_samples
    from qronos_onnx.ir.model_io import load_model
    from qronos_onnx.ir.signature import detect_signature

    options = SETTINGS[setting]
    bits, sym = options["bits"], options.get("symmetric", False)
    group = None if options["group_size"] == "channel" else options["group_size"]
    fmt = QuantFormat.QOperator  # MatMulNBits
    if method == "ort-gptq":
        signature = detect_signature(load_model(MODEL))
        reader = calibration_samples(MODEL, signature, "wiki-vital", ORT_WINDOWS, 512, None)
        config = GPTQWeightOnlyQuantConfig(
            calibration_data_reader=reader,
            percdamp=0.01,
            block_size=128,
            actorder=False,
            perchannel=True,
        )
    elif group is None:
        # Its MatMulNBits blocks stop at 256, so per-channel weights are written as QDQ,
        # which ONNX Runtime fuses into MatMulNBits when it loads the model.
        fmt = QuantFormat.QDQ
        config = DefaultWeightOnlyQuantConfig(
            is_symmetric=sym, bits=bits, quant_format=fmt, channel_wised_quantize=True
        )
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=sym, bits=bits)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(MODEL)),
        bits=bits,
        block_size=group or -1,
        is_symmetric=sym,
        algo_config=config,
        quant_format=fmt,
    )
    quantizer.process()
    shutil.rmtree(out.parent, ignore_errors=True)  # onnx appends to an existing data file
    out.parent.mkdir(parents=True)
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(SETTINGS), help="settings to run")
    ap.add_argument("--methods", nargs="+", help="only these methods (rtn, gptq, qronos, ...)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
    ap.add_argument(
        "--cache",
        type=Path,
        default=CACHE,
        help="where rows are cached (another file re-measures rows without losing the old)",
    )
    ap.add_argument("--row", nargs=3, help=argparse.SUPPRESS)  # setting method result.json
    args = ap.parse_args()
    if args.row:
        Path(args.row[2]).write_text(json.dumps(run_one(*args.row[:2])))
        return
    if not MODEL.is_file():
        sys.exit(f"{MODEL} is missing: run python models/smollm2.py first")
    path = args.cache
    cache = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    jobs = [("float", "float")] + [
        (s, m)
        for s in (args.only or SETTINGS)
        for m in rows_for(s)
        if not args.methods or m in args.methods
    ]
    for setting, method in jobs:
        key = f"{setting}|{method}"
        if key in cache:
            continue
        print(f"running {setting} / {method} ...", flush=True)
        result = WORK / f"row-{os.getpid()}.json"  # by file: quantizers print to stdout
        result.parent.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)
        done = subprocess.run(
            [sys.executable, __file__, "--row", setting, method, str(result)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not result.exists():
            cache[key] = {"error": (done.stderr.strip().splitlines() or ["no result"])[-1][:300]}
        else:
            cache[key] = json.loads(result.read_text())
        print(f"  {cache[key]}", flush=True)
        # merged into the file as it is now: another run may have added rows meanwhile
        on_disk = json.loads(path.read_text()) if path.exists() else {}
        cache = {**on_disk, key: cache[key]} if not args.fresh else cache
        path.write_text(json.dumps(cache, indent=1))
    print(table(cache))


LABELS = {
    "rtn": "RTN (ours)",
    "gptq": "GPTQ (ours)",
    "gpfq": "GPFQ (ours)",
    "qronos": "**Qronos (ours)**",
    "ort-rtn": "ORT quantizer, default (RTN)",
    "ort-gptq": f"ORT quantizer, GPTQ ({ORT_WINDOWS} windows)",
}


def table(cache: dict) -> str:
    lines = [
        "| setting | method | perplexity | quantization time (s) | peak RSS (MB) | size (MB) |",
        "|---|---|---|---|---|---|",
    ]
    f = cache.get("float|float")
    if f:
        lines.append(f"| float32 | - | {f['perplexity']:.2f} | - | - | {f['size_mb']:.0f} |")
    for setting in SETTINGS:
        for method in rows_for(setting):
            row = cache.get(f"{setting}|{method}")
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {setting} | {LABELS[method]} | failed: {row['error']} | | | |")
                continue
            lines.append(
                f"| {setting} | {LABELS[method]} | {row['perplexity']:.2f} | "
                f"{row['seconds']:.0f} | {row['peak_rss_mb']:.0f} | {row['size_mb']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
