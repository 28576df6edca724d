"""The W4A4 floor on SmolLM2-135M: what the rotated int4 activations alone cost, and which layer
inputs cost most.

    python benchmarks/w4a4_floor.py NAME [--clip R] [--exclude PATTERN ...]
    python benchmarks/w4a4_floor.py float --float

Weights are 8-bit round-to-nearest per channel (nothing fitted on data, so no weight solver can
do better than its own weight error above this), activations as ``--w4a4`` quantizes them
(rotated network, int4 symmetric per token, clip ratio ``R``); ``--exclude`` leaves the layers
it matches (weights and inputs) in float. Perplexity on the first 10 windows of 512 tokens of
the *train* side of wiki-vital: the model fits nothing on them (per-token scales are computed at
run time), so they are held out, and choices made on them (the clip ratio) do not see the test
side. Prints one line per run; the figures are in RESULTS.md, "Rotations".
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m" / "model.onnx"
WORK = ROOT / "models" / "smollm2-135m-bench" / "w4a4-floor"


def main() -> None:
    import qronos_onnx
    from qronos_onnx.calibration.data import token_windows
    from qronos_onnx.eval import evaluate_windows

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name", help="the run's folder under models/smollm2-135m-bench/w4a4-floor")
    ap.add_argument("--clip", type=float, default=0.8, help="activation clip ratio")
    ap.add_argument("--exclude", nargs="*", default=[], help="layer patterns left in float")
    ap.add_argument("--float", action="store_true", help="evaluate the float model instead")
    args = ap.parse_args()
    windows = token_windows("wiki-vital", MODEL.parent, 512, 10, "train", random=False)
    if args.float:
        print(f"float: {evaluate_windows(MODEL, windows, progress=False).perplexity:.2f}")
        return
    out = WORK / args.name / "model.onnx"
    qronos_onnx.optimize(
        MODEL,
        out,
        bits=8,
        group_size="channel",
        symmetric=True,
        act_bits=4,
        act_clip=args.clip,
        rotate="hadamard",
        algo="rtn",
        exclude=tuple(args.exclude),
        force=True,
        progress=False,
    )
    result = evaluate_windows(out, windows, progress=False)
    print(f"{args.name}: clip {args.clip}, float {args.exclude}: {result.perplexity:.2f}")


if __name__ == "__main__":
    main()
