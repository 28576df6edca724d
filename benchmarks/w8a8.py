"""W8A8 on SmolLM2-135M: ONNX Runtime's integer kernels against the float simulation of the
same file, for the weight forms that are exact on every x86 CPU, and CPU forward time.

    python benchmarks/w8a8.py [--fresh]

For each weight form, the model is quantized once (``--w8a8``: Qronos, uint8 static
per-tensor activations, 32 x 512 calibration tokens) and evaluated twice on the README's
protocol (40 x 512 test tokens): with ONNX Runtime's default session, which fuses the QDQ pairs
into integer MatMuls (``MatMulIntegerToFloat``), and with graph optimizations off, which computes
every QuantizeLinear/DequantizeLinear pair in float (the simulation the solver calibrated on).
Then the forward time of one 512-token window, interleaved over all models, median of 10 runs
after 2 warm-ups. Rows are cached in ``benchmarks/w8a8.json`` as they are measured. Which x86
kernel ONNX Runtime picks depends on the CPU: the header says which instruction sets this one
has (the u8 x s8 saturation shows only without VNNI; ``ir/int8_kernels.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m" / "model.onnx"
CACHE = Path(__file__).with_name("w8a8.json")
WORK = ROOT / "models" / "smollm2-135m-w8a8"

#: weight form -> optimize() overrides of the w8a8 preset
FORMS = {
    "int8, 7-bit symmetric (u8 x s8 kernel)": {"bits": 7, "symmetric": True},
    "uint8, 8-bit asymmetric (u8 x u8 kernel)": {"bits": 8, "symmetric": False},
    "uint8, 8-bit symmetric, zero point 128 (u8 x u8 kernel)": {"bits": 8, "symmetric": True},
}
#: Every form without rotations (the preset rotates since this table was measured): the
#: kernels' exactness depends on the weight codes only; the rotated preset is measured in
#: benchmarks/quality.py.
ROTATE = "none"


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.findall(r"\b(avx2|avx512f|avx512_vnni|avx_vnni|amx_int8)\b", text))
    model = re.search(r"model name\s*:\s*(.*)", text)
    name = model.group(1) if model else platform.processor()
    return f"{name}: {', '.join(sorted(flags)) or 'none of avx2/avx512/vnni'}"


def perplexity(path: Path, windows: np.ndarray, optimize: bool) -> float:
    from qronos_onnx.calibration.session import make_session, run_session
    from qronos_onnx.eval.perplexity import log_softmax
    from qronos_onnx.ir.model_io import load_model
    from qronos_onnx.ir.signature import detect_signature

    signature = detect_signature(load_model(path))
    session = make_session(str(path), "cpu", optimize=optimize)
    nll, count = 0.0, 0
    for ids in windows:
        logits = run_session(session, [signature.logits], signature.feed(ids[None]), "model")[0]
        logp = log_softmax(logits[0, :-1])
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    return float(np.exp(nll / count))


def forward_times(paths: dict[str, Path], window: np.ndarray, repeat: int = 10) -> dict[str, float]:
    """Median seconds of one forward pass of ``window`` per model, runs interleaved."""
    from qronos_onnx.calibration.session import make_session
    from qronos_onnx.ir.model_io import load_model
    from qronos_onnx.ir.signature import detect_signature

    runs = {}
    for name, path in paths.items():
        signature = detect_signature(load_model(path))
        runs[name] = (make_session(str(path), "cpu"), signature.feed(window[None]))
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(repeat + 2):
        for name, (session, feed) in runs.items():
            t0 = time.perf_counter()
            session.run(["logits"], feed)
            if i >= 2:
                seconds[name].append(time.perf_counter() - t0)
    return {name: float(np.median(s)) for name, s in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
    args = ap.parse_args()
    import qronos_onnx
    from qronos_onnx.calibration.data import token_windows

    cache = {} if args.fresh or not CACHE.exists() else json.loads(CACHE.read_text())
    windows = token_windows("wiki-vital", MODEL.parent, 512, 40, "test", random=False)
    paths = {"float32": MODEL}
    if "float32" not in cache:
        p = perplexity(MODEL, windows, True)
        cache["float32"] = {"integer": p, "simulated": p}
    for form, overrides in FORMS.items():
        out = WORK / re.sub(r"\W+", "_", form).strip("_") / "model.onnx"
        paths[form] = out
        if form in cache and out.is_file():
            continue
        print(f"quantizing: {form}", flush=True)
        t0 = time.perf_counter()
        report = qronos_onnx.optimize(
            MODEL, out, "w8a8", rotate=ROTATE, force=True, progress=False, **overrides
        )
        cache[form] = {
            "quantize_seconds": time.perf_counter() - t0,
            "size_mb": report.totals.output_bytes / 1e6,
            "integer": perplexity(out, windows, True),
            "simulated": perplexity(out, windows, False),
        }
        print(f"  {cache[form]}", flush=True)
        CACHE.write_text(json.dumps(cache, indent=1))
    for name, seconds in forward_times(paths, windows[0]).items():
        cache[name]["forward_seconds"] = seconds
    cache["cpu"] = cpu_flags()
    CACHE.write_text(json.dumps(cache, indent=1))
    print(f"CPU: {cache['cpu']}")
    print(
        "| model | perplexity, integer kernels | perplexity, float simulation | difference | "
        "forward (s, 1 x 512) |"
    )
    print("|---|---|---|---|---|")
    for name in paths:
        row = cache[name]
        diff = 100 * (row["integer"] - row["simulated"]) / row["simulated"]
        print(
            f"| {name} | {row['integer']:.2f} | {row['simulated']:.2f} | {diff:+.2f}% | "
            f"{row['forward_seconds']:.3f} |"
        )


if __name__ == "__main__":
    main()
