"""Size against perplexity on SmolLM2-135M: size budgets (``--bits-per-weight``) against
uniform grids, a ratio heuristic in the style of Olive's and NNCF's mixed precision, and ONNX
Runtime GenAI's builder (its int4, and its ``k_quant_mixed``).

    .venv/bin/python models/smollm2.py --checkpoint     # the model and its checkpoint
    .venv/bin/python benchmarks/mixed.py [--rows NAME ...]   # rows are cached in mixed.json
    .venv/bin/python benchmarks/mixed.py --plot          # benchmarks/mixed.png (needs matplotlib)
    .venv/bin/python models/gemma3.py && .venv/bin/python benchmarks/mixed.py --held-out
                                                         # Gemma-3-270M: mixed-held-out.json

Every model is scored on the protocol (40 windows of 512 tokens of wiki-vital's test side); its
size is the stored bytes of its quantized weights (codes, scales, zero points, read from the
file: ``qronos_onnx.ir.sizes``). The lm_head and the embedding stay float in every row (ours:
``--lm-head skip``; the builder: ``nodes_to_exclude``), and the kernel keeps float activations
(``--accuracy-level 0``): the quantized layers are the same 210 in every row.

- *budget*: ``--bits-per-weight`` at a share of the stored size of uniform int4 asymmetric
  group 128; the first one measures, the others reuse its measurements (``--sensitivity``).
- *ratio heuristic*: one primary grid, and the layer groups with the largest one-shot score
  promoted to a backup grid until the size is reached (NNCF's ``ratio`` with a data-aware
  score; Olive's ``SelectiveMixedPrecision``). The score is each group's relative output error
  with round-to-nearest codes on the primary grid, from the same calibration statistics; the
  layers are then solved by Qronos like ours. (int4 in groups of 64 is the primary at 100%:
  MatMulNBits pads SmolLM2's 576 inputs to 640 in blocks of 128, so groups of 64 are smaller.)

``--held-out``: the reference, the two budgets and the two heuristics on a model no choice here
was made on, Gemma-3-270M (``models/gemma3.py``, from PyPI: sandwich norms, a vocabulary of
262,144, hidden 640), on the same protocol.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "models" / "smollm2-135m-hf"


#: Every one of our rows: float lm_head and embedding, float activations in the kernel, range
#: scales (as the reference; MSE-searched scales are orthogonal to the allocation).
COMMON = {
    "lm_head": "skip",
    "accuracy_level": 0,
    "scale_search": "minmax",
    "progress": False,
    "force": True,
}
#: The size every share is of: uniform int4 asymmetric, group 128 (range scales: the
#: earlier default, perplexity 16.21).
REFERENCE = "uniform int4 asym g128 (minmax)"
A4G128 = {"bits": 4, "group_size": 128, "symmetric": False}
A2G64 = {"bits": 2, "group_size": 64, "symmetric": False}
A4G64 = {"bits": 4, "group_size": 64, "symmetric": False}
S8G64 = {"bits": 8, "group_size": 64, "symmetric": True}
MEASURING = "budget 100% (relative)"  # the first budget row measures

#: name -> (kind, settings). Kinds: uniform (options), budget (share, weighting),
#: heuristic (share, primary grid, backup grid, score grid), builder (extra options).
ROWS: dict[str, tuple[str, dict]] = {
    REFERENCE: ("uniform", A4G128),
    MEASURING: ("budget", {"share": 1.0, "weighting": "relative"}),
    "budget 75% (relative)": ("budget", {"share": 0.75, "weighting": "relative"}),
    "--w3 (int3 asym g128, in the 4-bit container)": ("uniform", {"config": "w3"}),
    "ratio heuristic 100% (int4 g64 + int8 g64)": (
        "heuristic",
        {"share": 1.0, "primary": A4G64, "backup": S8G64, "score": A4G64},
    ),
    "ratio heuristic 75% (int2 g64 + int4 g64)": (
        "heuristic",
        {"share": 0.75, "primary": A2G64, "backup": A4G64, "score": A2G64},
    ),
    "budget 100% (absolute)": ("budget", {"share": 1.0, "weighting": "absolute"}),
    "budget 75% (absolute)": ("budget", {"share": 0.75, "weighting": "absolute"}),
    "budget 87.5% (relative)": ("budget", {"share": 0.875, "weighting": "relative"}),
    "budget 60% (relative)": ("budget", {"share": 0.6, "weighting": "relative"}),
    "budget 125% (relative)": ("budget", {"share": 1.25, "weighting": "relative"}),
    "uniform int4 asym g64": ("uniform", A4G64),
    "uniform int8 sym g64": ("uniform", S8G64),
    "uniform int2 asym g64": ("uniform", A2G64),
    "builder int4 (RTN, block 32, sym)": ("builder", {}),
    "builder int4, algo_config=k_quant_mixed": ("builder", {"algo_config": "k_quant_mixed"}),
}
BUILDER_EXCLUDE = "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"


@dataclass(frozen=True)
class Setup:
    """A model and how it is measured."""

    model: Path  # the float model
    tokenizer: Path  # a folder with its tokenizer
    work: Path  # the rows' models
    results: Path  # the rows' measurements (JSON)
    seqlen: int  # calibration and evaluation windows
    rows: tuple[str, ...]


SMOLLM2 = Setup(
    ROOT / "models" / "smollm2-135m" / "model.onnx",
    CHECKPOINT,
    ROOT / "models" / "smollm2-135m-mixed",
    Path(__file__).with_name("mixed.json"),
    512,
    tuple(ROWS),
)
HELD_OUT = Setup(
    ROOT / "models" / "gemma3-270m" / "model.onnx",
    ROOT / "models" / "gemma3-270m",
    ROOT / "models" / "gemma3-270m-mixed",
    Path(__file__).with_name("mixed-held-out.json"),
    512,
    (
        REFERENCE,
        MEASURING,
        "budget 75% (relative)",
        "ratio heuristic 100% (int4 g64 + int8 g64)",
        "ratio heuristic 75% (int2 g64 + int4 g64)",
    ),
)


def folder(setup: Setup, name: str) -> Path:
    return setup.work / "".join(c if c.isalnum() else "_" for c in name).strip("_")


def measured(setup: Setup) -> Path:
    """The measuring run's report (kept beside the rows: every budget and heuristic row reads
    its measurements)."""
    return setup.work / "measured.report.json"


def stored_bytes(model: Path) -> int:
    import onnx_ir as ir

    from qronos_onnx.ir.sizes import stored_weights

    return sum(w.bytes for w in stored_weights(ir.load(model)))


def reference_bits(cache: dict) -> float:
    """Stored bits per weight of the reference row."""
    row = cache[REFERENCE]
    return 8 * row["stored_bytes"] / row["parameters"]


def make(setup: Setup, name: str, cache: dict) -> Path:
    """The row's model (made once): ``folder/model.onnx``."""
    import qronos_onnx
    from qronos_onnx.export import run_builder

    kind, spec = ROWS[name]
    out = folder(setup, name)
    model = out / "model.onnx"
    if model.is_file():
        return model
    if kind == "builder":
        extra = ",".join([BUILDER_EXCLUDE, *(f"{k}={v}" for k, v in spec.items())])
        run_builder(setup.tokenizer, out, "int4", extra)
        return model
    options = {**COMMON, "seqlen": setup.seqlen}
    config = None
    if kind == "uniform":
        config = spec.get("config")
        options.update({k: v for k, v in spec.items() if k != "config"})
    elif kind == "budget":
        options["bits_per_weight"] = spec["share"] * reference_bits(cache)
        options["mix_weighting"] = spec["weighting"]
        if measured(setup).is_file():
            options["sensitivity"] = str(measured(setup))
    else:
        options.update(spec["primary"])
        options["overrides"] = heuristic_overrides(setup, spec, cache)
    qronos_onnx.optimize(setup.model, model, config, **options)
    if kind == "budget" and not measured(setup).is_file():
        shutil.copyfile(out / "model.report.json", measured(setup))
    return model


def heuristic_overrides(setup: Setup, spec: dict, cache: dict) -> tuple[str, ...]:
    """The ratio heuristic's promotions: groups by decreasing one-shot score (relative
    round-to-nearest output error on ``score``'s grid, from the measuring run), promoted to
    the backup grid while the stored size stays within the share."""
    from qronos_onnx.quant import Grid
    from qronos_onnx.registry import get_format

    report = json.loads(measured(setup).read_text())
    shapes = {t["name"]: t["shape"] for t in report["targets"]}
    fmt = get_format("matmulnbits")

    def grid(fields: dict) -> Grid:
        g = fields["group_size"]
        return Grid(fields["bits"], None if g == "channel" else g, fields["symmetric"])

    def size(g: Grid, names: list[str]) -> int:
        return sum(fmt.stored_bytes(g.for_features(shapes[n][1]), *shapes[n], 4) for n in names)

    primary, backup, score_grid = grid(spec["primary"]), grid(spec["backup"]), grid(spec["score"])
    units = report["budget"]["units"]

    def score(unit: dict) -> float:
        for c in unit["candidates"]:
            if Grid(**c["grid"]).group_size in (score_grid.group_size, None) and (
                c["grid"]["bits"],
                c["grid"]["symmetric"],
            ) == (score_grid.bits, score_grid.symmetric):
                return sum(e / r for e, r in zip(c["errors_rtn"], unit["output_ref"], strict=True))
        raise ValueError(f"no candidate like {score_grid} in {unit['targets']}")

    budget = spec["share"] * cache[REFERENCE]["stored_bytes"]
    used = sum(size(primary, u["targets"]) for u in units)
    if used > budget:
        raise SystemExit(f"the primary grid alone ({used:,} B) exceeds the size ({budget:,.0f} B)")
    promoted = []
    for unit in sorted(units, key=score, reverse=True):
        extra = size(backup, unit["targets"]) - size(primary, unit["targets"])
        if used + extra <= budget:
            used += extra
            promoted.extend(unit["targets"])
    b = backup
    sym = "sym" if b.symmetric else "asym"
    spec_text = f"bits:{b.bits},group:{b.group_size or 'channel'},{sym}"
    return tuple(f"{n}={spec_text}" for n in promoted)


def measure(setup: Setup, model: Path, seconds: float) -> dict:
    """Perplexity on 40 test windows, and the stored bytes."""
    from qronos_onnx.calibration.data import token_windows
    from qronos_onnx.eval import evaluate_windows

    windows = token_windows("wiki-vital", setup.tokenizer, setup.seqlen, 40, "test", random=False)
    result = evaluate_windows(model, windows, progress=False)
    row = {"perplexity": result.perplexity, "stored_bytes": stored_bytes(model)}
    report = model.with_name("model.report.json")
    if report.is_file():
        r = json.loads(report.read_text())
        row["parameters"] = r["totals"]["quantized_parameters"]
        row["quantize_seconds"] = r["totals"]["wall_seconds"]
        if r.get("budget"):
            row["budget_bytes"] = r["budget"]["budget_bytes"]
            row["used_bytes"] = r["budget"]["used_bytes"]
    else:
        row["quantize_seconds"] = seconds
    return row


def plot(setup: Setup, cache: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {
        "budget (relative)": ("o-", "C0"),
        "budget (absolute)": ("s--", "C1"),
        "ratio heuristic": ("^", "C2"),
        "uniform": ("x", "C3"),
        "builder": ("D", "C4"),
    }
    series: dict[str, list] = {k: [] for k in styles}
    for name, row in cache.items():
        if "perplexity" not in row or name not in ROWS:
            continue
        kind, spec = ROWS[name]
        key = (
            f"budget ({spec['weighting']})"
            if kind == "budget"
            else {"heuristic": "ratio heuristic"}.get(kind, kind)
        )
        series[key].append((row["stored_bytes"] / 1e6, row["perplexity"], name))
    for key, points in series.items():
        if not points:
            continue
        points.sort()
        style, color = styles[key]
        xs, ys, _ = zip(*points, strict=True)
        ax.plot(xs, ys, style, color=color, label=key)
        if key in ("uniform", "builder", "ratio heuristic"):
            for x, y, n in points:
                ax.annotate(
                    n.split(" (")[0], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
    ax.set_yscale("log")
    ax.set_xlabel("stored MB of the quantized layers (codes, scales, zero points)")
    ax.set_ylabel("perplexity (wiki-vital test, 40 x 512)")
    ax.set_title(f"{setup.model.parent.name}: size against perplexity, lm_head and embedding float")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="*", help="rows to make and measure (default: all)")
    ap.add_argument("--plot", action="store_true", help="draw benchmarks/mixed.png and stop")
    ap.add_argument("--held-out", action="store_true", help="the tiny Gemma-3 relative")
    args = ap.parse_args()
    setup = HELD_OUT if args.held_out else SMOLLM2
    cache = json.loads(setup.results.read_text()) if setup.results.exists() else {}
    if args.plot:
        plot(setup, cache, setup.results.with_suffix(".png"))
        return
    if not setup.model.is_file() or not (setup.tokenizer / "tokenizer.json").is_file():
        sys.exit(f"{setup.model} is missing: see this script's docstring")
    if setup is SMOLLM2 and not (CHECKPOINT / "config.json").is_file():
        sys.exit("run: python models/smollm2.py --checkpoint")
    for name in args.rows or setup.rows:
        if name in cache and "perplexity" in cache[name]:
            continue
        t0 = time.perf_counter()
        print(f"{time.strftime('%H:%M:%S')} making {name} ...", flush=True)
        model = make(setup, name, cache)
        cache[name] = measure(setup, model, time.perf_counter() - t0)
        print(f"  {cache[name]}", flush=True)
        setup.results.write_text(json.dumps(cache, indent=1) + "\n")
    print("| row | stored bytes | bits/weight | perplexity |")
    print("|---|---|---|---|")
    for name in setup.rows:
        row = cache.get(name)
        if row and "perplexity" in row:
            bpw = 8 * row["stored_bytes"] / cache[REFERENCE]["parameters"]
            print(f"| {name} | {row['stored_bytes']:,} | {bpw:.3f} | {row['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
