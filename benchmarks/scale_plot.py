"""The picture of ``benchmarks/scale.jsonl``: peak memory against depth and against calibration
tokens, anonymous (the process's own) and resident (with the file-backed pages) apart.

    .venv/bin/pip install matplotlib    # (the ``bench`` extra)
    .venv/bin/python benchmarks/scale_plot.py [--results benchmarks/scale.jsonl] \\
        [--out benchmarks/scale.png]

Only rows that name the commit they measured are drawn (the streaming engine's; older rows
are the code before it), the last of each setting.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def _shape(model: str) -> tuple[str, int]:
    """``h2048-i8192-l2-v32000-float32`` -> (``h2048-i8192-v32000-float32``, 2)."""
    layers = int(re.search(r"-l(\d+)-", model).group(1))  # type: ignore[union-attr]
    return re.sub(r"-l\d+-", "-", model), layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "scale.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    latest = {}  # one point per setting: its last measurement
    for r in rows:
        if r.get("commit"):
            key = (r["model"], r["preset"], r["windows"] * r["seqlen"], r["max_memory"])
            latest[key] = r
    by_depth: dict[tuple, list] = defaultdict(list)
    by_tokens: dict[tuple, list] = defaultdict(list)
    for r in latest.values():
        shape, layers = _shape(r["model"])
        tokens = r["windows"] * r["seqlen"]
        budget = r["max_memory"] or "default"
        by_depth[(shape, r["preset"], tokens, budget)].append((layers, r))
        by_tokens[(r["model"], r["preset"], budget)].append((tokens, r))
    fig, (depth, tokens_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, groups, xlabel in (
        (depth, by_depth, "decoder layers"),
        (tokens_ax, by_tokens, "calibration tokens"),
    ):
        for key, points in sorted(groups.items(), key=lambda kv: str(kv[0])):
            if len({x for x, _ in points}) < 2:
                continue  # one point says nothing against this axis
            points.sort(key=lambda p: p[0])
            xs = [x for x, _ in points]
            label = " ".join(str(k) for k in key)
            line = ax.plot(xs, [r["peak_RssAnon"] / GB for _, r in points], "o-", label=label)
            ax.plot(xs, [r["peak_VmRSS"] / GB for _, r in points], "o--", color=line[0].get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak memory, GB (solid: anonymous; dashed: resident)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    depth.set_title("memory against depth")
    tokens_ax.set_title("memory against calibration tokens")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
