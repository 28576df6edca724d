"""Peak host memory of one layer's statistics and solve, in units of ``d^2`` bytes.

Runs what the calibration does for the widest layer of a model: ``GroupStats`` accumulates
``H`` and ``G`` from random mismatched activations (``--tokens`` of them, in windows of 512),
then the solver runs on a ``[C, d]`` weight, with the report's RTN terms, as
``passes/calibrate.py`` does. Each width runs in a fresh process that samples its own
``/proc/self/status`` (RssAnon) every 2 ms; the peak is taken above the memory held before the
statistics were created (weight and one window of activations included in that baseline).

    .venv/bin/python benchmarks/solve_memory.py --widths 4096 8192 14336 --rows 4096

Run it with ``PYTHONPATH`` pointing at another checkout to measure that code (the script uses
the owned hand-over when the library has it, and the plain call otherwise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def one(d: int, rows: int, tokens: int, algorithm: str) -> dict:
    import numpy as np
    import torch

    from qronos_onnx.calibration.stats import GroupStats
    from qronos_onnx.quant import Grid, QuantizedWeight, SolveInfo, rtn_codes, solve

    torch.manual_seed(0)
    W = torch.randn(rows, d) / d**0.5
    rng = np.random.default_rng(0)
    window = 512
    x = rng.standard_normal((window, d), dtype=np.float32)
    xq = x + 0.05 * rng.standard_normal((window, d), dtype=np.float32)
    grid = Grid(bits=4, group_size=128)
    phase = ["accumulate"]
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peaks[phase[0]] = max(peaks.get(phase[0], 0), rss_anon())
            time.sleep(0.002)

    base = rss_anon()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    stats = GroupStats(d)
    for _ in range(max(1, tokens // window)):
        stats.add(x, xq)
    accumulated = time.perf_counter() - t0
    try:
        from qronos_onnx.quant.problem import SecondMoments
    except ImportError:
        SecondMoments = None
    phase[0] = "finalize"
    if SecondMoments is not None:
        moments = SecondMoments(*stats.finalize(), owned=True)
        del stats
        phase[0] = "solve"
        terms = {}

        def on_grid(weight, scales, zero_points):
            rtn = QuantizedWeight(
                rtn_codes(W, grid, scales, zero_points), scales, zero_points, grid, SolveInfo("rtn")
            ).dequantize()
            terms["cross"] = float((W.float() @ moments.G.float() * rtn).sum())
            terms["quad"] = float((rtn @ moments.H.float() * rtn).sum())

        q = solve(algorithm, W, grid=grid, moments=moments, on_grid=on_grid)
        del moments
    else:  # the plain call: the caller keeps H and G (the report's terms need them after)
        H, G = stats.finalize()
        del stats
        phase[0] = "solve"
        q = solve(algorithm, W, H, G, grid=grid)
        rtn = QuantizedWeight(
            rtn_codes(W, grid, q.scales, q.zero_points), q.scales, q.zero_points, grid, q.info
        ).dequantize()
        float((W.float() @ G.float() * rtn).sum())
        float((rtn @ H.float() * rtn).sum())
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    extra = max(peaks.values()) - base
    return {
        "d": d,
        "rows": rows,
        "tokens": tokens,
        "algorithm": algorithm,
        "peak_bytes": extra,
        "peak_d2": round(extra / d**2, 2),
        "phase_peak_d2": {k: round((v - base) / d**2, 2) for k, v in peaks.items()},
        "accumulate_s": round(accumulated, 1),
        "total_s": round(seconds, 1),
        "owned": SecondMoments is not None,
        "codes_sum": int(q.codes.long().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--algorithm", default="qronos")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rows, args.tokens, args.algorithm)))
        return
    for d in args.widths:
        cmd = [sys.executable, __file__, "--one", str(d), "--rows", str(args.rows)]
        cmd += ["--tokens", str(args.tokens), "--algorithm", args.algorithm]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
