"""Cost of two-stream calibration + Qronos against one plain ONNX Runtime forward pass.

    python benchmarks/calibration.py [--windows 32] [--seqlen 512]

SmolLM2-135M (``models/smollm2.py`` builds it) and the calibration protocol of the README:
``--windows`` windows of ``--seqlen`` tokens from the train side of wiki-vital, batch 1. Each
part runs in its own process so that its peak RSS is its own:

- ``forward``: one plain ORT session over the full model (logits and all), every window once;
- ``quantize``: the quantize pass (Qronos, int4 asymmetric, group 64): both streams, the
  statistics and the solves; the model is not saved.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m" / "model.onnx"


def part(name: str, windows: int, seqlen: int) -> dict:
    import onnxruntime as ort

    from qronos_onnx.calibration.data import calibration_windows, load_tokenizer, wiki_vital_text
    from qronos_onnx.calibration.runner import CalibrationOptions
    from qronos_onnx.ir.model_io import load_model
    from qronos_onnx.ir.signature import detect_signature
    from qronos_onnx.pipeline import quantize_model
    from qronos_onnx.quant import Grid
    from qronos_onnx.scheme import Scheme

    encode = load_tokenizer(MODEL.parent)
    chosen = calibration_windows(encode(wiki_vital_text("train")), seqlen, windows)
    model = load_model(MODEL)
    samples = [detect_signature(model).feed(w[None]) for w in chosen]
    result = {}
    t0 = time.perf_counter()
    if name == "forward":
        session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        for feed in samples:
            session.run(None, feed)
    else:
        qpass = quantize_model(
            model,
            Scheme(grid=Grid(bits=4, group_size=64)),
            samples,
            CalibrationOptions(progress=False),
            fmt=None,
        )
        result = {k: round(v, 1) for k, v in qpass.run_info.seconds.items()}
        result["session_runs"] = qpass.run_info.session_runs
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--part", choices=["forward", "quantize"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps(part(args.part, args.windows, args.seqlen)))
        return
    if not MODEL.is_file():
        sys.exit(f"{MODEL} is missing: run python models/smollm2.py first")
    runs = {}
    for name in ("forward", "quantize"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--part",
                name,
                "--windows",
                str(args.windows),
                "--seqlen",
                str(args.seqlen),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
        print(name, runs[name], flush=True)
    f, q = runs["forward"], runs["quantize"]
    print("\n| part | wall time (s) | peak RSS (MB) |\n|---|---|---|")
    print(
        f"| plain ORT forward, {args.windows} x {args.seqlen} tokens | {f['seconds']:.1f} | "
        f"{f['peak_rss_mb']:.0f} |"
    )
    print(f"| calibration + Qronos solve | {q['seconds']:.1f} | {q['peak_rss_mb']:.0f} |")
    print(f"| of which: stage runs (2 streams) | {q['stages']:.1f} | |")
    print(f"| of which: H, G statistics | {q['statistics']:.1f} | |")
    print(f"| of which: solves | {q['solve']:.1f} | |")
    print(f"\nratio: {q['seconds'] / f['seconds']:.2f}x the plain forward pass (target <= 2.5x)")


if __name__ == "__main__":
    main()
