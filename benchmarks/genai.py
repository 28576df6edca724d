"""This tool's default output against ONNX Runtime GenAI's model builder's int4, in ONNX
Runtime GenAI: size, decoding speed, prompt time and perplexity, in one run.

    python benchmarks/genai.py [--model smollm2|tiny] [--runs 5] [--fresh] [--speed]

The float model is the builder's float32 CPU export of the checkpoint (``smollm2``: SmolLM2-135M,
``python models/smollm2.py --checkpoint`` makes it; ``tiny``: the test Llama with untied
weights, built here); every quantized row starts from it. Rows:

- the builder's int4 at its defaults (RTN, block 32, symmetric, ``accuracy_level`` 4, the
  lm_head int4 and the embedding reading it), with ``algo_config=k_quant``, and with its
  mixed precision ``k_quant_mixed`` (the last MatMul and llama.cpp's "mixed layers" in int8);
- ours at the defaults (``optimize`` with no option: the builder's grid, int4 symmetric in
  blocks of 32, with MSE-searched scales), with the builder's range scales, and at the
  default before this comparison (group 128 asymmetric): as it is, with ``--lm-head int8``,
  with ``--accuracy-level 0`` (float activations in the kernel and in the solver), and that
  last model run at level 4 without having been solved for it (what level 4 costs a solver
  that does not see it).

Perplexity: the README's protocol (40 x 512 test tokens of wiki-vital, 32 x 512 calibration
tokens), ONNX Runtime. Speed: ONNX Runtime GenAI (CPU, its default threads) generating 128
tokens greedily after a 64-token prompt; ``--runs`` rounds in which every row generates once
(interleaved, after one warm-up each), medians of the decoding tokens per second (the generated
part) and of the prompt's time. Rows are cached in ``benchmarks/genai[-tiny].json`` as they are
measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "smollm2": (ROOT / "models" / "smollm2-135m-hf", ROOT / "models" / "smollm2-135m-genai"),
    "tiny": (ROOT / "models" / "tiny-untied-hf", ROOT / "models" / "tiny-untied-genai"),
}

#: The default grid before issue 24 (int4 asymmetric, group 128, range scales).
OLD_DEFAULT = {"group_size": 128, "symmetric": False, "scale_search": "minmax"}

#: row -> None (the float model), "builder:EXTRA" (the builder's int4 with extra options), or
#: optimize() options ("run_at_level_4": written at level 0, then set to 4)
ROWS = {
    "float32 (GenAI builder)": None,
    "builder int4 (defaults: RTN, block 32, sym)": "builder:",
    "builder int4, algo_config=k_quant": "builder:algo_config=k_quant",
    "builder int4, algo_config=k_quant_mixed": "builder:algo_config=k_quant_mixed",
    "ours, defaults (group 32, sym, MSE scales)": {},
    "ours, minmax scales (the builder's grid and scales)": {"scale_search": "minmax"},
    "ours, group 128 asym (the earlier default)": OLD_DEFAULT,
    "ours, group 128 asym, --lm-head int8": {**OLD_DEFAULT, "lm_head": "int8"},
    "ours, group 128 asym, --accuracy-level 0": {**OLD_DEFAULT, "accuracy_level": 0},
    "ours, group 128 asym, --accuracy-level 0 run at level 4 (not simulated)": {
        **OLD_DEFAULT,
        "accuracy_level": 0,
        "run_at_level_4": True,
    },
}


def build_float(checkpoint: Path, work: Path) -> Path:
    path = work / "float" / "model.onnx"
    if not path.is_file():
        from qronos_onnx.export import export_checkpoint
        from qronos_onnx.options import ExportOptions

        export_checkpoint(checkpoint, path.parent, ExportOptions(exporter="genai"))
    return path


def set_level_4(folder: Path) -> None:
    """Give every MatMulNBits that MLAS runs with int8 activations ``accuracy_level`` 4 (the
    weights are untouched: the data file stays)."""
    import onnx

    from qronos_onnx.formats.matmulnbits import INT8_KERNEL_BITS, INT8_KERNEL_BLOCKS

    path = folder / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits" and (
            attrs["bits"] in INT8_KERNEL_BITS and attrs["block_size"] in INT8_KERNEL_BLOCKS
        ):
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", 4)])
    onnx.save(proto, str(path))


def quantized(name: str, spec, checkpoint: Path, work: Path, float_model: Path) -> Path:
    """The row's model folder (made once)."""
    import qronos_onnx
    from qronos_onnx.export import run_builder

    out = work / "".join(c if c.isalnum() else "_" for c in name).strip("_")
    if (out / "model.onnx").is_file():
        return out
    if isinstance(spec, str):
        run_builder(checkpoint, out, "int4", spec.split(":", 1)[1])
        return out
    options = {k: v for k, v in spec.items() if k != "run_at_level_4"}
    if spec.get("run_at_level_4"):
        source = quantized(
            "ours, --accuracy-level 0", {"accuracy_level": 0}, checkpoint, work, float_model
        )
        shutil.copytree(source, out)
        set_level_4(out)
        return out
    qronos_onnx.optimize(float_model, out / "model.onnx", force=True, progress=False, **options)
    return out


def quality(folder: Path, checkpoint: Path) -> dict:
    from qronos_onnx.calibration.data import token_windows
    from qronos_onnx.eval import evaluate_windows

    windows = token_windows("wiki-vital", checkpoint, 512, 40, "test", random=False)
    result = evaluate_windows(folder / "model.onnx", windows, progress=False)
    size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    return {"perplexity": result.perplexity, "size_mb": size / 1e6}


def one_generation(model, prompt: int, new: int) -> tuple[float, float]:
    """``(decoding tokens per second, prompt seconds)`` of one greedy generation."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt + new, min_length=prompt + new, do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(list(range(100, 100 + prompt)))
    t1 = time.perf_counter()
    count = 0
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    return count / (time.perf_counter() - t1), t1 - t0


def speeds(folders: dict[str, Path], runs: int, prompt: int = 64, new: int = 128) -> dict:
    """Interleaved generations: every row once per round, after a warm-up of each."""
    import onnxruntime_genai as og

    models = {name: og.Model(str(folder)) for name, folder in folders.items()}
    for model in models.values():
        one_generation(model, prompt, new)
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            seen[name].append(one_generation(model, prompt, new))
    return {
        name: {
            "tokens_per_second": float(np.median([s for s, _ in runs_])),
            "prompt_seconds": float(np.median([p for _, p in runs_])),
            "runs": len(runs_),
        }
        for name, runs_ in seen.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds of generation")
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
    ap.add_argument("--speed", action="store_true", help="measure the speeds again")
    args = ap.parse_args()
    checkpoint, work = MODELS[args.model]
    cache_path = Path(__file__).with_name(
        "genai.json" if args.model == "smollm2" else "genai-tiny.json"
    )
    if args.model == "tiny" and not (checkpoint / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from models.tiny_llama import build_checkpoint

        build_checkpoint(checkpoint, untied=True)
    if not (checkpoint / "config.json").is_file():
        sys.exit(f"{checkpoint} is missing: run python models/smollm2.py --checkpoint")
    float_model = build_float(checkpoint, work)
    cache = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    folders = {}
    for name, spec in ROWS.items():
        t0 = time.perf_counter()
        folder = (
            float_model.parent
            if spec is None
            else quantized(name, spec, checkpoint, work, float_model)
        )
        made = time.perf_counter() - t0
        folders[name] = folder
        if name in cache and "perplexity" in cache[name]:
            continue
        print(f"measuring {name} ...", flush=True)
        cache[name] = {**quality(folder, checkpoint), "folder": str(folder.relative_to(ROOT))}
        if spec is not None:
            cache[name]["quantize_seconds"] = made
        print(f"  {cache[name]}", flush=True)
        cache_path.write_text(json.dumps(cache, indent=1))
    if args.speed or any("tokens_per_second" not in cache[n] for n in ROWS):
        for name, measured in speeds(folders, args.runs).items():
            cache[name].update(measured)
        cache_path.write_text(json.dumps(cache, indent=1))
    print("| model | perplexity | size (MB) | GenAI decode tokens/s | prompt (64 tokens, ms) |")
    print("|---|---|---|---|---|")
    for name in ROWS:
        row = cache[name]
        print(
            f"| {name} | {row['perplexity']:.2f} | {row['size_mb']:.3g} | "
            f"{row['tokens_per_second']:.1f} | {1000 * row['prompt_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
