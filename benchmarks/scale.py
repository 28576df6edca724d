"""Peak host memory of ``optimize`` on random-weight Llama-shaped models of real widths.

Builds a Llama with random weights (``models/tiny_llama.py``'s exporter, byte-level tokenizer)
at the given widths and depth, then runs ``qronos-onnx optimize`` on it as a child process and
samples the child's ``/proc/PID/status`` every 0.1 s: resident anonymous memory (heap: what
the tool holds) and resident file-backed memory (the memory-mapped weights, which the kernel
can drop) apart. The report gives the calibration's own accounting (activations in memory and
on disk, statistics batches).

    .venv/bin/python benchmarks/scale.py --hidden 4096 --intermediate 14336 --layers 2 \\
        --windows 32 --seqlen 512 [--max-memory 1] [--dtype float16] --out /tmp/scale

Each row is appended to ``--results`` (JSON lines) and printed. Models are cached in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(out: Path, hidden: int, intermediate: int, layers: int, vocab: int, dtype: str) -> Path:
    """The model at ``out/model.onnx`` (built once)."""
    path = out / "model.onnx"
    if path.exists():
        return path
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from models.tiny_llama import config, write_tokenizer
    from qronos_onnx.export.torch_export import export_causal_lm

    heads = hidden // 128
    cfg = config(
        layers,
        untied=True,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)  # transformers' initialisation: normal(0, 0.02), norms at 1
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    export_causal_lm(model, path, kv_cache=False)
    write_tokenizer(out / "tokenizer.json")
    return path


def status(pid: int) -> dict[str, int]:
    """``RssAnon``, ``RssFile`` and ``VmRSS`` of ``pid`` in bytes (empty once it has exited)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("RssAnon", "RssFile", "VmRSS"):
                    values[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def measure(
    cmd: list[str], more: Callable[[int], dict[str, int]] | None = None, every: float = 0.1
) -> dict:
    """Run ``cmd``; its time and the peak of RssAnon, RssFile and VmRSS (and of whatever
    ``more(pid)`` samples too) every ``every`` seconds, as ``peak_<name>`` in bytes."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: dict[str, int] = {}

    def sample():
        while child.poll() is None:
            values = {**status(child.pid), **(more(child.pid) if more else {})}
            for key, value in values.items():
                peak[key] = max(peak.get(key, 0), value)
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = child.communicate()
    sampler.join()
    if child.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({child.returncode}):\n{err[-3000:]}")
    seconds = round(time.perf_counter() - t0, 1)
    return {"seconds": seconds, **{f"peak_{k}": v for k, v in peak.items()}}


def _commit() -> str:
    """The code measured: HEAD's short hash, ``+`` when the tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()

    return git("rev-parse", "--short", "HEAD").strip() + (
        "+" if git("status", "--porcelain").strip() else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--preset", default="--w4")
    parser.add_argument("--max-memory", default=None, help="passed to optimize (GB)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more options")
    parser.add_argument("--out", type=Path, default=Path("/tmp/qronos-scale"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "scale.jsonl")
    args = parser.parse_args()

    name = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-{args.dtype}"
    shape = (args.hidden, args.intermediate, args.layers, args.vocab, args.dtype)
    model = build(args.out / name, *shape)
    output = args.out / f"{name}-q" / "q.onnx"
    cmd = [sys.executable, "-m", "qronos_onnx.cli", "optimize", str(model), "-o", str(output)]
    cmd += [args.preset, "--calib-windows", str(args.windows), "--seqlen", str(args.seqlen)]
    cmd += ["--force", "-q"] + (["--max-memory", args.max_memory] if args.max_memory else [])
    cmd += args.extra
    row = {
        "commit": _commit(),
        "model": name,
        "file_bytes": sum(p.stat().st_size for p in model.parent.iterdir()),
        "preset": args.preset,
        "windows": args.windows,
        "seqlen": args.seqlen,
        "max_memory": args.max_memory,
        "extra": args.extra,
        **measure(cmd),
    }
    report = json.loads(output.with_suffix(".report.json").read_text())
    row["calibration"] = {
        k: report["calibration"].get(k) for k in ("activations_mb", "stats_batches", "seconds")
    }
    line = json.dumps(row)
    print(line, flush=True)
    with args.results.open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
