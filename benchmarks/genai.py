"""SmolLM2-135M through ONNX Runtime GenAI's model builder: the builder's own int4 against this
tool's solvers, as perplexity, model size and GenAI generation speed, in one run.

    python benchmarks/genai.py [--fresh]

The float model is ``qronos-onnx export models/smollm2-135m-hf`` (the builder, float32, CPU;
``python models/smollm2.py --checkpoint`` makes the checkpoint). Rows:

- the builder's int4 (``-p int4``: RTN, block 32, symmetric, ``accuracy_level`` 4 so the CPU
  kernel quantizes activations to int8, the lm_head in int4 too), and with
  ``algo_config=k_quant``;
- ``--w4`` (Qronos, group 128 asymmetric), ``--w4 --group-size 32`` with RTN, GPTQ and Qronos,
  and the builder's grid (``--group-size 32 --sym``) with the same three, and Qronos there
  with ``--lm-head int8`` (the builder quantizes its lm_head as well) and with
  ``--accuracy-level 4`` (int8 activations in the CPU kernel, as the builder writes).

Perplexity: the README's protocol (40 x 512 test tokens of wiki-vital, 32 x 512 calibration
tokens), ONNX Runtime. Speed: ONNX Runtime GenAI (CPU, its default threads) generating 128
tokens greedily after a 64-token prompt, the median of 3 runs after a warm-up, as tokens per
second of the generated part (prompt time excluded), measured for all rows after the
perplexities (``--speed`` measures them again). Rows are cached in ``benchmarks/genai.json``
as they are measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "smollm2-135m-hf"
WORK = ROOT / "models" / "smollm2-135m-genai"
FLOAT = WORK / "float" / "model.onnx"
CACHE = Path(__file__).with_name("genai.json")

#: row -> optimize() options (our rows) or builder extra options (``builder:`` rows)
ROWS = {
    "float32 (GenAI builder)": None,
    "builder int4 (default: RTN, block 32, sym)": "builder:",
    "builder int4, algo_config=k_quant": "builder:algo_config=k_quant",
    "--w4 (Qronos, g128 asym)": {},
    "RTN, g32 asym": {"group_size": 32, "algo": "rtn"},
    "GPTQ, g32 asym": {"group_size": 32, "algo": "gptq"},
    "Qronos, g32 asym": {"group_size": 32},
    "RTN, g32 sym (the builder's grid)": {"group_size": 32, "symmetric": True, "algo": "rtn"},
    "GPTQ, g32 sym": {"group_size": 32, "symmetric": True, "algo": "gptq"},
    "Qronos, g32 sym": {"group_size": 32, "symmetric": True},
    "Qronos, g32 sym, --lm-head int8": {"group_size": 32, "symmetric": True, "lm_head": "int8"},
    "Qronos, g32 sym, --accuracy-level 4": {
        "group_size": 32,
        "symmetric": True,
        "accuracy_level": 4,
    },
    "Qronos, g32 sym, --lm-head int8 --accuracy-level 4": {
        "group_size": 32,
        "symmetric": True,
        "lm_head": "int8",
        "accuracy_level": 4,
    },
}


def build_float() -> None:
    if not FLOAT.is_file():
        from qronos_onnx.export import export_checkpoint
        from qronos_onnx.options import ExportOptions

        export_checkpoint(CHECKPOINT, FLOAT.parent, ExportOptions(exporter="genai"))


def builder_int4(out: Path, extra: str) -> None:
    """The model builder's own int4 model, written to ``out`` (a folder)."""
    from qronos_onnx.export import run_builder

    run_builder(CHECKPOINT, out, "int4", extra)


def generation_speed(folder: Path, prompt: int = 64, new: int = 128, runs: int = 3) -> float:
    """Generated tokens per second in ONNX Runtime GenAI (median of ``runs``)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    ids = list(range(1000, 1000 + prompt))
    speeds = []
    for i in range(runs + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + new, min_length=prompt + new, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        t0 = time.perf_counter()
        count = 0
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        if i:  # the first run warms up
            speeds.append(count / (time.perf_counter() - t0))
    return float(np.median(speeds))


def measure(name: str, spec) -> dict:
    import qronos_onnx
    from qronos_onnx.calibration.data import token_windows
    from qronos_onnx.eval import evaluate_windows

    if spec is None:
        path, seconds = FLOAT, 0.0
    else:
        out = WORK / "".join(c if c.isalnum() else "_" for c in name).strip("_")
        path = out / "model.onnx"
        t0 = time.perf_counter()
        if not path.is_file():
            if isinstance(spec, str):
                builder_int4(out, spec.split(":", 1)[1])
            else:
                qronos_onnx.optimize(FLOAT, path, force=True, progress=False, **spec)
        seconds = time.perf_counter() - t0
    windows = token_windows("wiki-vital", CHECKPOINT, 512, 40, "test", random=False)
    result = evaluate_windows(path, windows, progress=False)
    size = sum(p.stat().st_size for p in path.parent.glob("model.onnx*"))
    return {
        "perplexity": result.perplexity,
        "quantize_seconds": seconds,
        "size_mb": size / 1e6,
        "folder": str(path.parent.relative_to(ROOT)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
    ap.add_argument("--speed", action="store_true", help="measure the speeds again")
    args = ap.parse_args()
    if not (CHECKPOINT / "model.safetensors").is_file():
        sys.exit(f"{CHECKPOINT} is missing: run python models/smollm2.py --checkpoint")
    build_float()
    cache = {} if args.fresh or not CACHE.exists() else json.loads(CACHE.read_text())
    for name, spec in ROWS.items():
        if name in cache:
            continue
        print(f"measuring {name} ...", flush=True)
        cache[name] = measure(name, spec)
        print(f"  {cache[name]}", flush=True)
        CACHE.write_text(json.dumps(cache, indent=1))
    if args.speed or any("tokens_per_second" not in cache[n] for n in ROWS):
        for name in ROWS:  # all at the end, on a quiet machine
            cache[name]["tokens_per_second"] = generation_speed(ROOT / cache[name]["folder"])
            print(f"{name}: {cache[name]['tokens_per_second']:.1f} tokens/s", flush=True)
        CACHE.write_text(json.dumps(cache, indent=1))
    print("| model | perplexity | size (MB) | GenAI tokens/s |")
    print("|---|---|---|---|")
    for name in ROWS:
        row = cache[name]
        print(
            f"| {name} | {row['perplexity']:.2f} | {row['size_mb']:.0f} | "
            f"{row['tokens_per_second']:.1f} |"
        )


if __name__ == "__main__":
    main()
