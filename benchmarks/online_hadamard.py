"""What the online Hadamards (R4) cost at run time: ONNX Runtime CPU forward time of a rotated
W4 model with its online Hadamard nodes against the same model without them, same run.

    python benchmarks/online_hadamard.py [MODEL]

MODEL defaults to the W4 g64 asym Qronos model with rotations that ``benchmarks/quality.py``
writes. The comparison model is a copy of it with the online Hadamard nodes bypassed (each
down projection reads the activation directly): the same weights and kernels, only R4's nodes
missing (its outputs are wrong; only its time counts). The unrotated W4 g64 Qronos model of
``quality.py`` is timed too, when present. Two shapes: a 512-token prompt (batch 1, empty KV
cache) and one decoding step after 511 cached tokens; the median of ``--runs`` interleaved runs
each, after a warm-up, with ONNX Runtime's default CPU threads. Also prints the multiply-adds
per token of the online Hadamards against the model's layers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.online_hadamard import hadamard_source, is_online_hadamard
from qronos_onnx.ir.signature import detect_signature

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "models" / "smollm2-135m-bench"
ROTATED = BENCH / "W4_g64_asym_+_rotations_qronos" / "model.onnx"
PLAIN = BENCH / "W4_g64_asym_qronos" / "model.onnx"


def without_online_hadamards(path: Path, out: Path) -> int:
    """Save ``path`` with every online Hadamard bypassed to ``out``; returns how many."""
    model = load_model(path)
    bypassed = set()
    for node in list(model.graph):
        x = node.inputs[0] if node.inputs else None
        producer = None if x is None else x.producer()
        reads_one = x is not None and producer is not None and is_online_hadamard(producer)
        if reads_one and not is_online_hadamard(node):
            node.replace_input_with(0, hadamard_source(x))
            bypassed.add(x.name)
    for node in [n for n in model.graph if is_online_hadamard(n)]:
        model.graph.remove(node, safe=False)
    ir.save(model, out, external_data=out.name + ".data")
    return len(bypassed)


def hadamard_macs(path: Path) -> tuple[int, int]:
    """Multiply-adds per token of the online Hadamards and of the MatMulNBits layers. An online
    Hadamard of width ``n = a b`` costs ``n a`` (``A^T X``) plus ``n b`` (``X B``); its factor
    constants are named ``qronos.hadamard.{n}...``."""
    model = load_model(path)
    online = 0
    for node in model.graph:
        if is_online_hadamard(node) and node.op_type == "MatMul":
            factor = next(v for v in node.inputs if v is not None and v.const_value is not None)
            n = int(factor.name.split(".")[2])
            online += n * factor.const_value.shape[0]
    layers = sum(
        n.attributes["K"].as_int() * n.attributes["N"].as_int()
        for n in model.graph
        if n.op_type == "MatMulNBits"
    )
    return online, layers


def feeds(path: Path) -> dict[str, dict]:
    signature = detect_signature(load_model(path))
    rng = np.random.default_rng(0)
    prompt = signature.feed(rng.integers(0, 1000, (1, 512)))
    step = signature.feed(rng.integers(0, 1000, (1, 1)))
    for past in signature.past:
        step[past.name] = np.zeros((1, past.kv_heads, 511, past.head_dim), past.dtype)
    if signature.attention_mask:
        step[signature.attention_mask] = np.ones((1, 512), np.int64)
    if signature.position_ids:
        step[signature.position_ids] = np.array([[511]], np.int64)
    return {"prompt (512 tokens)": prompt, "decode step (511 cached)": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", type=Path, default=ROTATED)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "model.onnx"
        bypassed = without_online_hadamards(args.model, bare)
        models = {"with R4": args.model, "R4 nodes removed": bare}
        if PLAIN.is_file():
            models["unrotated W4 g64"] = PLAIN
        sessions = {
            k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            for k, p in models.items()
        }
        print(f"{bypassed} online Hadamards; onnxruntime {ort.__version__}")
        for shape, feed in feeds(args.model).items():
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for s in sessions.values():
                s.run(None, feed)  # warm-up
            for _ in range(args.runs):
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, feed)
                    times[name].append(time.perf_counter() - start)
            base = statistics.median(times["R4 nodes removed"])
            for name, runs in times.items():
                m = statistics.median(runs)
                print(f"{shape}: {name}: {1000 * m:.2f} ms ({100 * (m / base - 1):+.1f}%)")
    online, layers = hadamard_macs(args.model)
    print(
        f"multiply-adds per token: online Hadamards {online / 1e6:.2f} M, quantized layers "
        f"{layers / 1e6:.1f} M ({100 * online / layers:.1f}%)"
    )


if __name__ == "__main__":
    main()
