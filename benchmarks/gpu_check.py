"""One-GPU check: quantize a Llama-3-8B-shaped model with ``--device cuda`` and print where the
memory and the time went. Run it as it is on a CUDA machine (``onnxruntime-gpu`` installed):

    .venv/bin/python benchmarks/gpu_check.py                  # 8B-shaped, 2 layers, 32 x 512
    .venv/bin/python benchmarks/gpu_check.py --device cpu     # the same on the CPU

It builds a random-weight model (hidden 4096, intermediate 14336, vocabulary 128256 unless told
otherwise; ``benchmarks/scale.py``'s builder, cached in ``--out``), runs ``qronos-onnx optimize``
on it as a child process, and prints: the device and ONNX Runtime providers used, peak GPU
memory of the child (sampled from ``nvidia-smi`` every 0.5 s), peak host memory (anonymous and
file-backed, from ``/proc``), the calibration's time by part and the solve time per layer.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import build, measure


def gpu_memory(pid: int) -> dict[str, int]:
    """``{"gpu": bytes of GPU memory pid uses}`` (``nvidia-smi``); empty without one."""
    if shutil.which("nvidia-smi") is None:
        return {}
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    out = subprocess.run(query, check=False, capture_output=True, text=True).stdout
    used = [int(m) for p, m in re.findall(r"(\d+),\s*(\d+)", out) if int(p) == pid]
    return {"gpu": sum(used) * 2**20}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("/tmp/qronos-gpu-check"))
    args = parser.parse_args(argv)

    name = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-{args.dtype}"
    shape = (args.hidden, args.intermediate, args.layers, args.vocab, args.dtype)
    model = build(args.out / name, *shape)
    output = args.out / f"{name}-q" / "q.onnx"
    cmd = [sys.executable, "-m", "qronos_onnx.cli", "optimize", str(model), "-o", str(output)]
    cmd += ["--w4", "--calib-windows", str(args.windows), "--seqlen", str(args.seqlen)]
    cmd += ["--device", args.device, "--force", "-q"]
    peak = measure(cmd, gpu_memory, every=0.5) if args.device == "cuda" else measure(cmd)
    report = json.loads(output.with_suffix(".report.json").read_text())
    calibration = report["calibration"]
    per_layer: dict[str, float] = collections.defaultdict(float)
    for target in report["targets"]:
        layer = re.search(r"layers\.(\d+)\.", target["name"])
        per_layer[layer.group(1) if layer else target["name"]] += target["solve_seconds"]
    summary = {
        "device": args.device,
        "providers": calibration.get("providers"),
        "peak_gpu_bytes": peak.get("peak_gpu"),
        "peak_host_anon_bytes": peak.get("peak_RssAnon"),
        "peak_host_file_bytes": peak.get("peak_RssFile"),
        "seconds": peak["seconds"],
        "calibration_seconds": calibration.get("seconds"),
        "solve_seconds_per_layer": {k: round(v, 2) for k, v in per_layer.items()},
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
