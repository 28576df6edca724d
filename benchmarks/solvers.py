"""Per-layer time and objective of the solvers, against a plain GPTQ written here as reference.

    python benchmarks/solvers.py [--device cpu|cuda] [--shapes 576x576 ...]

Shapes are ``OUTxIN`` (``W`` is ``[out, in]``). Each layer gets synthetic calibration data with
a realistic structure (correlated features, a few outlier channels) and a quantized stream
``X~ = X + drift``, with ``n = 2 * in`` tokens. The objective is the relative mismatched error
``||W X - Q X~||^2 / ||W X||^2``, computed from the statistics. Every row is one call of
``qronos_onnx.quant.solve`` (grid fitting included), best of ``--repeat`` runs.

The reference is IST-DASLab's ``gptq.py`` loop as published (dynamic groups, no act-order,
block 128), re-typed here so that both run in the same process on the same data.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import time

import torch

from qronos_onnx.quant import Grid, solve

GRID = Grid(bits=4, group_size=128, symmetric=False)


def make_layer(out_f: int, in_f: int, device: str, seed: int = 0):
    """``W [out, in]``, ``H``, ``G``, and ``Sxx = X X^T / n`` (float32 stats -> float64)."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * in_f
    mix = torch.randn(in_f, in_f, generator=g) / math.sqrt(in_f) + torch.eye(in_f)
    X = mix @ torch.randn(in_f, n, generator=g)
    X[torch.randperm(in_f, generator=g)[:8]] *= 8.0
    # Low-rank drift of about 3% of the signal, plus 5% white noise: earlier layers' error.
    drift = 0.03 * torch.randn(in_f, 8, generator=g) @ torch.randn(8, in_f, generator=g)
    drift /= math.sqrt(8 * in_f)
    Xq = X + drift @ X + 0.05 * torch.randn(in_f, n, generator=g)
    W = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    X, Xq, W = X.to(device), Xq.to(device), W.to(device)
    H = (Xq @ Xq.T / n).double()
    G = (X @ Xq.T / n).double()
    Sxx = (X @ X.T / n).double()
    return W, H, G, Sxx


def objective(W, Q, H, G, Sxx) -> float:
    """``||W X - Q X~||^2 / ||W X||^2`` from the statistics (trace form)."""
    W, Q = W.double(), Q.double()
    ref = torch.sum((W @ Sxx) * W)
    err = ref - 2 * torch.sum((W @ G) * Q) + torch.sum((Q @ H) * Q)
    return float(err / ref)


def plain_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    groupsize: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """IST-DASLab GPTQ (``gptq.py``, ``fasterquant``), asymmetric min-max, no act-order.

    Returns the dequantized weight.
    """
    W = W.clone().float()
    H = H.clone().float()
    cols = W.shape[1]
    maxq = 2**bits - 1

    def find_params(x):
        xmin = torch.minimum(x.min(1).values, torch.zeros(1, device=x.device))
        xmax = torch.maximum(x.max(1).values, torch.zeros(1, device=x.device))
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def quantize(x, scale, zero):
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        return scale * (q - zero)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    scale, zero = find_params(W[:, :groupsize])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, (i1 + i) : (i1 + i + groupsize)])
            q = quantize(w.unsqueeze(1), scale, zero).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def timed(fn, repeat: int, device: str):
    best, out = float("inf"), None
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--shapes", nargs="+", default=["576x576", "1536x576", "576x1536", "2048x2048", "4096x4096"]
    )
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()} grid={GRID}"
    )
    print("| shape (out x in) | solver | act-order | time (s) | objective |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        out_f, in_f = map(int, shape.lower().split("x"))
        W, H, G, Sxx = make_layer(out_f, in_f, args.device)
        rows = [  # (label, act-order, solver run on this layer's W, H, G)
            ("rtn", False, lambda W, H, G: solve("rtn", W, grid=GRID).dequantize()),
            (
                "plain GPTQ (IST-DASLab)",
                False,
                lambda W, H, G: plain_gptq(W, H, GRID.bits, GRID.group_size),
            ),
            (
                "gptq",
                False,
                lambda W, H, G: solve("gptq", W, H, grid=GRID, act_order=False).dequantize(),
            ),
            (
                "gptq",
                True,
                lambda W, H, G: solve("gptq", W, H, grid=GRID, act_order=True).dequantize(),
            ),
            ("qronos", True, lambda W, H, G: solve("qronos", W, H, G, grid=GRID).dequantize()),
            (
                "qronos ls",
                True,
                lambda W, H, G: solve("qronos", W, H, G, grid=GRID, variant="ls").dequantize(),
            ),
            ("gpfq", True, lambda W, H, G: solve("gpfq", W, H, G, grid=GRID).dequantize()),
        ]
        times = {}
        for label, act, fn in rows:
            seconds, Q = timed(functools.partial(fn, W, H, G), args.repeat, args.device)
            times[(label, act)] = seconds
            print(
                f"| {out_f}x{in_f} | {label} | {'yes' if act else 'no'} | {seconds:.3f} | "
                f"{objective(W, Q, H, G, Sxx):.5f} |",
                flush=True,
            )
        ratio = times[("qronos", True)] / times[("gptq", True)]
        vs_ref = times[("gptq", False)] / times[("plain GPTQ (IST-DASLab)", False)]
        print(f"| {out_f}x{in_f} | **qronos / gptq time** | | {ratio:.2f}x | |")
        print(f"| {out_f}x{in_f} | **gptq / plain GPTQ time** | | {vs_ref:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()
