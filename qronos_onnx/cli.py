"""``qronos-onnx optimize | eval | inspect``: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import QronosError
from .files.placement import write_text_file
from .files.signals import TERMINATING, Terminated, termination_as_interrupt
from .options import DEFAULT_PRESET, PRESETS, EvalOptions, ExportOptions, Options
from .schema import alternatives, choices, fields, hints, is_list, meta

if TYPE_CHECKING:
    from .report import Report

EPILOG = "Errors a user can fix print one line and exit with status 2."


def _optimize(args: argparse.Namespace) -> int:
    from . import api  # here, not at import: --help stays instant

    report = api.optimize(args.model, args.output, optimize_options(args))
    try:
        _print(summary_table(report))
        _flush()
    except (KeyboardInterrupt, _StdoutError) as err:  # the output is complete: say so
        setattr(err, "completed_output", report.output)  # noqa: B010 (the exceptions' own types)
        raise
    return 0


def given(args: argparse.Namespace, schema: type) -> dict:
    """The options of ``schema`` given on a command line (``add_options`` leaves the others
    out of the namespace); no progress bars when stderr is not a terminal."""
    values = {f.name: getattr(args, f.name) for f in fields(schema) if hasattr(args, f.name)}
    if "progress" in {f.name for f in fields(schema)} and not sys.stderr.isatty():
        values["progress"] = False  # progress bars are for terminals, not log files
    return values


def optimize_options(args: argparse.Namespace) -> Options:
    """The options of an ``optimize`` command line: the preset or ``--config`` recipe (default
    ``w4``), then every option given explicitly, checked together."""
    from .recipes import options_from

    return options_from(args.recipe or DEFAULT_PRESET, **given(args, Options))


def add_presets(parser: argparse.ArgumentParser) -> None:
    """``--w4`` ... ``--w8a8`` and ``--config RECIPE.yaml`` (one of them)."""
    from .recipes import recipe_path

    recipes = parser.add_mutually_exclusive_group()
    for preset in PRESETS:
        recipes.add_argument(
            f"--{preset}",
            dest="recipe",
            action="store_const",
            const=preset,
            help=f"preset: {_first_comment(recipe_path(preset))}",
        )
    recipes.add_argument(
        "--config",
        dest="recipe",
        metavar="RECIPE.yaml",
        help="a recipe file: options as YAML keys (the long flags without "
        "dashes), listing what differs from the defaults",
    )
    parser.set_defaults(recipe=None)


def add_options(parser: argparse.ArgumentParser, schema: type) -> None:
    """The flags of every option of ``schema`` (``options.py``).

    Only the flags given on the command line reach the namespace (their default is
    ``argparse.SUPPRESS``): a recipe's values stay unless a flag overrides them.
    """
    for f in fields(schema):
        opt = meta(f)
        flags = list(opt.switches)
        target = (
            parser.add_mutually_exclusive_group() if len(flags) + opt.takes_value > 1 else parser
        )
        if opt.takes_value:
            target.add_argument(
                opt.flag or "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=_parse_as(schema, f.name),
                metavar=opt.metavar,
                choices=None if is_list(schema, f.name) else choices(schema, f.name, only=True),
                nargs="+" if is_list(schema, f.name) else None,
                default=argparse.SUPPRESS,
                help=f"{opt.help} (default: {_shown(f.default)})",
            )
        for switch in flags:
            target.add_argument(
                *switch.flags,
                dest=f.name,
                action="store_const",
                const=switch.value,
                default=argparse.SUPPRESS,
                help=switch.help,
            )


def _first_comment(path: Path) -> str:
    """The summary of a recipe file: its first comment line, without its '# --name:' lead."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    return first.lstrip("# ").split(": ", 1)[-1]


def _parse_as(schema: type, name: str):
    """The converter of a field's command-line value: by its type annotation, with ``none``
    for an optional value and a named value (``channel``) beside a number."""
    kinds = alternatives(hints(schema)[name])
    named = choices(schema, name) or ()
    convert = int if int in kinds else float if float in kinds else str
    optional = type(None) in kinds

    def parse(text: str):
        if optional and text == "none":
            return None
        if convert is not str and text in named:
            return text
        return convert(text)

    return parse


def _shown(default) -> str:
    if isinstance(default, tuple):
        return "none" if not default else " ".join(default)
    return "none" if default is None else str(default)


def summary_table(report: Report) -> str:
    """A short, readable summary of the report."""
    rows = [("layer", "shape", "grid", "error rtn", "error", "s")]
    rows += [
        (
            t.name,
            "x".join(map(str, t.shape)),
            _grid_label(t.grid),
            _pct(t.error_rtn),
            _pct(t.error),
            f"{t.solve_seconds:.2f}",
        )
        for t in report.targets
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    tot = report.totals
    algorithm = report.targets[0].algorithm if report.targets else "-"
    lines.append("")
    lines.append(
        f"{tot.targets} layers ({algorithm}, {report.format}), {len(report.skipped)} "
        f"skipped; {tot.input_bytes / 1e6:.1f} MB -> {tot.output_bytes / 1e6:.1f} MB "
        f"in {tot.wall_seconds:.0f} s, peak RSS {tot.peak_rss_mb:.0f} MB"
    )
    if report.budget is not None:
        lines.append(budget_line(report.budget))
    if report.rotation is not None:
        r = report.rotation
        applied = ", ".join(a["name"] for a in r.applied) or "none"
        skipped = "".join(f"; {s['name']} skipped" for s in r.skipped)
        lines.append(
            f"rotations {applied}{skipped} (seed {r.seed}); float self-check: logits differ by "
            f"{r.check['error']:.1e} (tolerance {r.check['tolerance']:.0e})"
        )
    lines.extend(f"note: {n}" for n in report.notes)
    lines.append(f"wrote {report.output}")
    return "\n".join(lines)


def budget_line(budget: dict) -> str:
    """One line on a size budget's allocation: the bytes used, and the groups per grid."""
    chosen = Counter(_grid_label(u["candidates"][u["choice"]]["grid"]) for u in budget["units"])
    mix = ", ".join(f"{n} x {grid}" for grid, n in sorted(chosen.items()))
    return (
        f"budget {budget['bits_per_weight']:g} bits per weight: {budget['used_bytes'] / 1e6:.2f} "
        f"of {budget['budget_bytes'] / 1e6:.2f} MB for the quantized layers "
        f"({budget['weighting']} errors); layer groups: {mix}"
    )


def _grid_label(g: dict) -> str:
    return f"{'s' if g['symmetric'] else 'a'}{g['bits']} " + (
        f"g{g['group_size']}" if g["group_size"] else "ch"
    )


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _eval(args: argparse.Namespace) -> int:
    from . import api

    options = given(args, EvalOptions)
    if args.json:
        options["progress"] = False
    result = api.evaluate(args.model, **options)
    if args.json:
        _print(json.dumps(result.as_dict()))
        return 0
    seqlen = options.get("seqlen", EvalOptions().seqlen)
    _print(
        f"perplexity {result.perplexity:.4f} ({result.windows} windows of {seqlen} "
        f"tokens, {result.tokens} scored, {result.seconds:.0f} s)"
    )
    if result.kl is not None:
        assert result.top1_agreement is not None  # measured together with kl
        _print(
            f"KL(reference || model) {result.kl:.5f} nats/token, top-1 agreement "
            f"{100 * result.top1_agreement:.2f}%"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .ir.model_io import load_model
    from .ir.signature import detect_signature
    from .ir.sizes import stored_weights
    from .ir.stages import plan_stages
    from .ir.targets import find_targets, untie_lm_head
    from .passes.rotate import rotation_plan

    model = load_model(args.model)
    sig = detect_signature(model)
    if args.lm_head:
        untie_lm_head(model)
    _print(f"model {args.model}: opsets {dict(model.opset_imports)}")
    _print(
        f"signature: input_ids, attention_mask={sig.attention_mask is not None}, "
        f"position_ids={sig.position_ids is not None}, KV-cache inputs={len(sig.past)}, logits"
    )
    groups, skipped = find_targets(model, include_lm_head=args.lm_head)
    stages = plan_stages(model, groups)
    n = sum(len(g.targets) for g in groups)
    _print(f"targets: {n} in {len(groups)} groups; stages: {len(stages)}")
    for g in groups:
        names = ", ".join(
            f"{t.name} [{t.out_features}x{t.in_features}]"
            + (f" ({', '.join(f'{p} {a}:{b}' for p, a, b in t.parts)})" if t.parts else "")
            for t in g.targets
        )
        _print(f"  {names}")
    _print(f"skipped: {len(skipped)}")
    for s in skipped:
        _print(f"  {s.name} ({s.node}): {s.reason}")
    ops = Counter(n.op_type for n in model.graph)
    _print("rotations (--rotate hadamard):")
    for name, verdict in rotation_plan(model):
        _print(f"  {name}: {verdict}")
    formats = {
        k: ops[k]
        for k in (
            "MatMulNBits",
            "DequantizeLinear",
            "QuantizeLinear",
            "DynamicQuantizeLinear",
            "MatMul",
            "Gemm",
        )
        if ops[k]
    }
    _print(f"formats present: {formats}")
    weights = stored_weights(model)
    if weights:
        _print(f"quantized weights: {sum(w.bytes for w in weights) / 1e6:.2f} MB stored")
        kinds: dict[tuple[str, int, int], list[int]] = {}
        for w in weights:
            kinds.setdefault((w.op_type, w.bits, w.block), []).append(w.bytes)
        for (op, bits, block), sizes in sorted(kinds.items()):
            n, size = len(sizes), sum(sizes)
            blocks = f"blocks of {block}" if block else "per channel"
            _print(f"  {n} x {op} {bits}-bit, {blocks}: {size / 1e6:.2f} MB")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    path, used = export_checkpoint(
        args.checkpoint, args.output, ExportOptions().replace(**given(args, ExportOptions))
    )
    exporter = "ONNX Runtime GenAI's model builder" if used == "genai" else "torch.onnx"
    _print(f"wrote {path} ({exporter})")
    return 0


def _olive_config(args: argparse.Namespace) -> int:
    try:
        from .olive.registry import REGISTRY, merged_package_config

        config = REGISTRY if args.ours_only else merged_package_config()
    except ImportError as err:
        raise QronosError(
            f"Olive is not installed ({err}): pip install 'qronos-onnx[olive]'"
        ) from err
    text = json.dumps(config, indent=2) + "\n"
    if args.output is None:
        _print(text, end="")
        return 0
    output = Path(args.output)
    if output.is_dir() or not output.name:
        raise QronosError(f"{args.output!r} is a directory; give a file name")
    if output.exists() and not args.force:
        raise QronosError(f"{output} exists; pass --force to overwrite it")
    write_text_file(output, text)
    what = "QronosQuantization" if args.ours_only else "Olive's passes and QronosQuantization"
    _print(f"wrote {output}: {what} (use: olive run --config WORKFLOW --package-config {output})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the full usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    root = _Parser(
        prog="qronos-onnx",
        epilog=EPILOG,
        description="Post-training quantization of ONNX LLMs with Qronos.",
    )
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    o = sub.add_parser(
        "optimize",
        help="quantize a model",
        epilog=EPILOG,
        description="Quantize an ONNX decoder LLM. A preset or recipe sets the "
        "options (default --w4); explicit flags override it.",
    )
    o.add_argument(
        "model",
        help="input model.onnx (external data beside it), or a Hugging Face checkpoint "
        "directory (exported first, see the export command)",
    )
    o.add_argument(
        "-o",
        "--output",
        required=True,
        help="output .onnx (+ .onnx.data); for a checkpoint input, a directory may be given",
    )
    add_presets(o)
    add_options(o, Options)
    o.set_defaults(func=_optimize)

    e = sub.add_parser(
        "eval", help="perplexity (and agreement with a reference model)", epilog=EPILOG
    )
    e.add_argument("model")
    add_options(e, EvalOptions)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_eval)

    i = sub.add_parser(
        "inspect", help="LLM signature, targets, skipped layers, stages, formats", epilog=EPILOG
    )
    i.add_argument("model")
    i.add_argument("--lm-head", action="store_true", help="count the lm_head as a target")
    i.set_defaults(func=_inspect)

    x = sub.add_parser(
        "export",
        help="a Hugging Face checkpoint as a float ONNX model (GenAI builder or torch.onnx)",
        epilog=EPILOG,
        description="Export a local Hugging Face checkpoint to a float ONNX model directory "
        "(model.onnx, model.onnx.data, genai_config.json, tokenizer files) with ONNX Runtime "
        "GenAI's model builder when it is installed and able, else torch.onnx. No network.",
    )
    x.add_argument("checkpoint", help="a local Hugging Face checkpoint directory")
    x.add_argument("-o", "--output", required=True, help="the output directory (new or empty)")
    add_options(x, ExportOptions)
    x.set_defaults(func=_export)

    c = sub.add_parser(
        "olive-config",
        epilog=EPILOG,
        help="Olive package config with QronosQuantization registered",
        description="Olive's --package-config replaces its default registry; "
        "this writes Olive's registry and ours together.",
    )
    c.add_argument("-o", "--output", help="file to write (default: print)")
    c.add_argument("--ours-only", action="store_true", help="only the QronosQuantization entry")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.set_defaults(func=_olive_config)
    return root


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr (no source line), above any progress bar."""
    from tqdm import tqdm

    tqdm.write(f"qronos-onnx: {category.__name__}: {message}", file=sys.stderr)


class _StdoutError(Exception):
    """Standard output could not be written (full disk, closed pipe)."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


def _flush() -> None:
    """Flush standard output; a failure (a full disk) becomes a ``_StdoutError``."""
    try:
        sys.stdout.flush()
    except OSError as err:
        raise _StdoutError(err) from err


def _print(*args, **kwargs) -> None:
    """``print`` to standard output; a failure to write it becomes a ``_StdoutError``."""
    try:
        print(*args, **kwargs)
    except OSError as err:
        raise _StdoutError(err) from err


def main(argv: list[str] | None = None) -> int:
    for name in ("stdout", "stderr"):  # closed by the caller (`>&-`): write nowhere
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (lives as long as sys)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with warnings.catch_warnings(), termination_as_interrupt():  # both undone on return
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            code = args.func(args)
            _flush()  # a full stdout fails here, not at exit
            return code
        except QronosError as err:
            # one line, whatever a library's message that ours quotes looks like
            print(f"qronos-onnx: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        except Terminated as err:  # SIGTERM / SIGHUP: cleaned up like Ctrl-C
            print(f"qronos-onnx: terminated ({err}){_written(err)}", file=sys.stderr)
            return 128 + err.signum
        except KeyboardInterrupt as err:
            print(f"qronos-onnx: interrupted{_written(err)}", file=sys.stderr)
            return 130
        except _StdoutError as err:
            _drop_stdout()
            if isinstance(err.error, BrokenPipeError):  # piped into e.g. `head`: not an error
                return 0
            print(
                f"qronos-onnx: error: cannot write to standard output: {err}{_written(err)}",
                file=sys.stderr,
            )
            return 1
        except OSError as err:  # an operating-system failure not foreseen
            print(f"qronos-onnx: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 1


def _written(interrupt: BaseException) -> str:
    """What an interrupt that came after the outputs were placed leaves: say so."""
    output = getattr(interrupt, "completed_output", None)
    return "" if output is None else f" after {output} was written completely"


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what could not be
    written does not fail again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def run() -> None:
    """The console script: ``main``, then exit without reacting to a late Ctrl-C or SIGTERM
    (the work is done; only the interpreter's shutdown is left)."""
    code = main()
    for signum in (signal.SIGINT, *TERMINATING):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
