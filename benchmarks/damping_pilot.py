"""Pilot for the Qronos damping default: quantize SmolLM2 at one setting, print test perplexity.

    [WINDOWS=32] python benchmarks/damping_pilot.py BITS GROUP ALGO [DAMPING]

Writes ``models/smollm2-135m-damping/pilot_BITS_GROUP_ALGO_DAMPING/m.onnx`` and prints its
perplexity on the first 10 test windows; ``benchmarks/damping_validation.py`` then scores those
models on held-out train-side windows (the data the default was chosen on).
"""

import os
import sys
from pathlib import Path

import qronos_onnx
from qronos_onnx.calibration.data import token_windows
from qronos_onnx.eval import evaluate_windows

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m" / "model.onnx"
WORK = ROOT / "models" / "smollm2-135m-damping"


def main() -> None:
    bits, group, algo = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    damping = float(sys.argv[4]) if len(sys.argv) > 4 else None
    out = WORK / f"pilot_{bits}_{group}_{algo}_{damping}" / "m.onnx"
    report = qronos_onnx.optimize(
        MODEL,
        out,
        bits=bits,
        group_size=group,
        algo=algo,
        damping=damping,
        calib_windows=int(os.environ.get("WINDOWS", "32")),
        force=True,
        progress=False,
    )
    windows = token_windows("wiki-vital", MODEL.parent, 512, 10, "test", random=False)
    result = evaluate_windows(out, windows, progress=False)
    print(
        bits,
        group,
        algo,
        damping,
        "ppl",
        round(result.perplexity, 3),
        "time",
        report.totals.wall_seconds,
    )


if __name__ == "__main__":
    main()
