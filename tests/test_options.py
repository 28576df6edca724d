"""Every option declared once (``options.py``): presets are recipe files, recipes map 1:1
to flags, and the command line, the Python API and the Olive pass are one orchestrator."""

import argparse
import dataclasses
import json
import re
import shutil

import pytest
import yaml

import qronos_onnx
from qronos_onnx.cli import main, optimize_options, parser
from qronos_onnx.errors import QronosError
from qronos_onnx.options import PRESETS, Options
from qronos_onnx.recipes import dump_recipe, options_from, recipe_path
from qronos_onnx.schema import fields, meta

#: The presets as the README documents them (independent of the recipe files).
DOCUMENTED = {
    "w4": {},
    "w3mix": {"bits_per_weight": 3.25},
    "w3": {"bits": 3, "group_size": 128, "symmetric": False, "scale_search": "minmax"},
    "w2": {"bits": 2, "symmetric": False, "scale_search": "minmax"},
    "w4a4": {
        "group_size": "channel",
        "act_bits": 4,
        "act_clip": 0.8,
        "rotate": "hadamard",
        "lm_head": "skip",
    },
    "w8a8": {
        "bits": 7,
        "group_size": "channel",
        "scale_search": "minmax",
        "act_bits": 8,
        "act_granularity": "tensor",
        "act_symmetric": False,
        "format": "qdq",
        "rotate": "hadamard",
        "lm_head": "skip",
    },
}


def parse(*args) -> Options:
    return optimize_options(parser().parse_args(["optimize", "m.onnx", "-o", "q.onnx", *args]))


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_is_its_recipe_file(preset):
    """``--w4a4``, ``--config recipes/w4a4.yaml`` and ``optimize(..., "w4a4")`` are the same
    options, the ones the README documents."""
    expected = dataclasses.replace(Options(), **DOCUMENTED[preset])
    flag, recipe = parse(f"--{preset}"), parse("--config", str(recipe_path(preset)))
    assert flag.replace(progress=True) == recipe.replace(progress=True) == expected
    assert options_from(preset).non_defaults() == DOCUMENTED[preset]


#: A non-default value of every field, and the flags that give it.
EVERYTHING = {
    "bits": (3, ["--bits", "3"]),
    "group_size": (64, ["--group-size", "64"]),
    "symmetric": (False, ["--asym"]),
    "act_bits": (8, ["--act-bits", "8"]),
    "act_granularity": ("tensor", ["--act-granularity", "tensor"]),
    "act_symmetric": (False, ["--act-asym"]),
    "algo": ("gptq", ["--algo", "gptq"]),
    "damping": (0.05, ["--damping", "0.05"]),
    "act_order": (False, ["--no-act-order"]),
    "reference": ("stage", ["--reference", "stage"]),
    "lm_head": ("int8", ["--lm-head", "int8"]),
    "include": (("*mlp*", "*attn*"), ["--include", "*mlp*", "*attn*"]),
    "exclude": (("*down*",), ["--exclude", "*down*"]),
    "overrides": (("*k_proj=bits:8",), ["--override", "*k_proj=bits:8"]),
    "format": ("qdq", ["--format", "qdq"]),
    "accuracy_level": (1, ["--accuracy-level", "1"]),
    "calib_data": ("text.txt", ["--calib-data", "text.txt"]),
    "calib_windows": (8, ["--calib-windows", "8"]),
    "seqlen": (128, ["--seqlen", "128"]),
    "tokenizer": ("tok.json", ["--tokenizer", "tok.json"]),
    "device": ("cpu", ["--device", "cpu"]),
    "max_memory": (2.5, ["--max-memory", "2.5"]),
    "report": ("r.json", ["--report", "r.json"]),
    "force": (True, ["--force"]),
    "progress": (False, ["-q"]),
    "genai_config": (True, ["--genai-config"]),
    "exporter": ("torch", ["--exporter", "torch"]),
    "export_dtype": ("fp16", ["--export-dtype", "fp16"]),
    "keep_float": (True, ["--keep-float"]),
    "scale_search": ("minmax", ["--scale-search", "minmax"]),
    "rotate": ("hadamard", ["--rotate", "hadamard"]),
    "rotate_sites": (("R1", "R4"), ["--rotate-sites", "R1", "R4"]),
    "rotate_seed": (7, ["--rotate-seed", "7"]),
    "magr": (0.01, ["--magr", "0.01"]),
    "act_clip": (0.9, ["--act-clip", "0.9"]),
    "bits_per_weight": (3.5, ["--bits-per-weight", "3.5"]),
    "mix_grids": (("bits:2,group:64", "bits:4"), ["--mix-grids", "bits:2,group:64", "bits:4"]),
    "mix_weighting": ("relative", ["--mix-weighting", "relative"]),
    "sensitivity": ("old.report.json", ["--sensitivity", "old.report.json"]),
}


def test_a_recipe_maps_one_to_one_to_flags(tmp_path):
    """A recipe file setting every option (but ``force``, which only the command line or the
    call gives) equals the same options given as flags, and a configuration dumped as a recipe
    reads back the same."""
    assert set(EVERYTHING) == {f.name for f in fields(Options)}
    recipe = tmp_path / "all.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                k: list(v) if isinstance(v, tuple) else v
                for k, (v, _) in EVERYTHING.items()
                if k != "force"
            }
        )
    )
    flags = [a for _, args in EVERYTHING.values() for a in args]
    from_flags, from_file = parse(*flags), parse("--config", str(recipe), "--force")
    assert from_flags == from_file == Options(**{k: v for k, (v, _) in EVERYTHING.items()})
    dump_recipe(from_file, tmp_path / "again.yaml")
    assert options_from(tmp_path / "again.yaml", force=True) == from_file
    # explicit flags override the recipe; none and channel are values too
    assert parse("--w4a4", "--group-size", "64", "--act-bits", "none").non_defaults() == {
        "group_size": 64,
        "act_clip": 0.8,
        "rotate": "hadamard",
        "lm_head": "skip",
        "progress": False,
    }


def test_every_option_reaches_the_parser_and_the_olive_pass():
    pytest.importorskip("olive")
    from qronos_onnx.olive.qronos_pass import QronosQuantization

    dests = {a.dest for a in parser()._subparsers._group_actions[0].choices["optimize"]._actions}
    assert {f.name for f in fields(Options)} <= dests
    olive = QronosQuantization._default_config(None)
    assert {f.name for f in fields(Options) if meta(f).olive} | {"recipe", "data_config"} == set(
        olive
    )


@pytest.mark.parametrize(
    "content,message",
    [
        ("bits: 3\nflavour: mild\n", "unknown option"),
        ("[1, 2]\n", "must be a mapping"),
        ("bits: [\n", "cannot read the recipe"),
        ("bits: nine\n", "bits must be an int"),
        ("group_size: 0\n", "group_size must be a positive integer"),
        ("bits: " + "[" * 100_000 + "]" * 100_000 + "\n", "nest too deeply"),
        (
            (
                "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                "include: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
            ),
            "anchors and aliases are not allowed",
        ),
        ("bits: 3\nbits: 2\n", "'bits' is given twice"),
        ("force: true\n", "force cannot be set by a recipe; give it on the command line"),
        ("# " + "x" * (1 << 20) + "\n", "a recipe lists a few options"),
        ("".join(f"k{i}: 1\n" for i in range(50_000)), "and 49992 more"),
    ],
)
def test_bad_recipe_files_are_one_line(tmp_path, content, message, capsys):
    """A recipe is a plain mapping: no unbounded nesting or alias expansion, no key given
    twice, no ``force`` (overwriting is asked for on the command line), and an error about a
    bad one (many unknown keys included) is one short line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    with pytest.raises(QronosError, match=message):
        options_from(recipe)
    code = main(["optimize", "m.onnx", "-o", str(tmp_path / "q.onnx"), "--config", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 2000, err[:300]


@pytest.mark.slow
def test_cli_api_and_olive_write_byte_identical_models(tiny_models, tmp_path, monkeypatch):
    """One recipe through the three front ends: the same model file and data file, byte for
    byte (they are one orchestrator)."""
    olive_workflows = pytest.importorskip("olive.workflows")
    from qronos_onnx.olive.registry import merged_package_config

    source = tiny_models("nokv")
    models = tmp_path / "models" / "tiny-llama"
    shutil.copytree(source.parent, models)
    corpus = tmp_path / "text.txt"
    corpus.write_text(" ".join(["the quantized layers of a model"] * 800))
    recipe = {
        "bits": 3,
        "group_size": 32,
        "algo": "qronos",
        "calib_data": str(corpus),
        "calib_windows": 2,
        "seqlen": 64,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert (
        main(
            [
                "optimize",
                str(models / "model.onnx"),
                "-o",
                str(tmp_path / "cli" / "model.onnx"),
                "--config",
                str(tmp_path / "recipe.yaml"),
                "-q",
            ]
        )
        == 0
    )
    qronos_onnx.optimize(
        models / "model.onnx",
        tmp_path / "api" / "model.onnx",
        tmp_path / "recipe.yaml",
        progress=False,
    )
    monkeypatch.chdir(tmp_path)
    workflow = {
        "input_model": {"type": "ONNXModel", "model_path": str(models / "model.onnx")},
        "passes": {
            "qronos": {"type": "QronosQuantization", "recipe": str(tmp_path / "recipe.yaml")}
        },
        "evaluate_input_model": False,
        "output_dir": str(tmp_path / "olive"),
    }
    olive_workflows.run(workflow, package_config=merged_package_config())
    for name in ("model.onnx", "model.onnx.data"):
        files = [(tmp_path / d / name).read_bytes() for d in ("cli", "api", "olive")]
        assert files[0] == files[1] == files[2], name
    reports = [
        json.loads((tmp_path / d / "model.report.json").read_text())["targets"]
        for d in ("cli", "olive")
    ]
    assert [t["grid"] for t in reports[0]] == [t["grid"] for t in reports[1]]


def test_the_api_signature_lists_every_option():
    import inspect

    params = inspect.signature(qronos_onnx.optimize).parameters
    assert {f.name for f in fields(Options)} <= set(params)
    assert all(f.name in qronos_onnx.optimize.__doc__ for f in fields(Options))
    assert isinstance(argparse.SUPPRESS, str)


def test_a_recipe_value_can_be_replaced_by_a_flag(tmp_path):
    """The recipe and the flags are checked together: ``bits: 9`` from a file, ``--bits 4``
    on the command line is a valid run; alone, the recipe's value is refused, naming it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bits: 9\ngroup_size: 32\n")
    assert parse("--config", str(recipe), "--bits", "4").bits == 4
    with pytest.raises(QronosError, match=r"recipe .*r\.yaml: bits must be an integer in \[2, 8\]"):
        parse("--config", str(recipe))


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--rotate-seed", str(1 << 64), "rotate_seed must be an integer in [0, 2^64 - 1]"),
        ("--rotate-seed", "-1", "rotate_seed must be an integer in [0, 2^64 - 1]"),
        ("--magr", "1e9", "magr must be a number in [1e-08, 0.01]"),
        ("--magr", "1e-300", "magr must be a number in [1e-08, 0.01]"),
        ("--act-clip", "1e-300", "act_clip must be a number in [0.1, 1]"),
        ("--act-clip", "0", "act_clip must be a number in [0.1, 1]"),
        ("--rotate-sites", "R3", "rotate_sites must be one of R1, R2, R4"),
    ],
)
def test_degenerate_values_are_refused_where_they_are_declared(flag, value, message, capsys):
    """Values that zero every layer (a MagR or clip strength beyond any use), overflow (a
    seed beyond 64 bits, a MagR strength whose proximal step overflows) or name nothing are
    refused before any work, in one line."""
    with pytest.raises(QronosError, match=re.escape(message)):
        parse(flag, value)
    assert main(["optimize", "m.onnx", "-o", "q.onnx", flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_largest_seed_rotates(tiny_models, tmp_path):
    """The largest 64-bit seed is a seed (R2 draws with seed + 1, wrapped)."""
    corpus_text = tmp_path / "text.txt"
    corpus_text.write_text("the largest seed of all " * 40)
    report = qronos_onnx.optimize(
        tiny_models("nokv"),
        tmp_path / "q.onnx",
        algo="rtn",
        group_size=32,
        rotate="hadamard",
        rotate_seed=(1 << 64) - 1,
        calib_data=corpus_text,
        calib_windows=1,
        seqlen=32,
        progress=False,
    )
    assert report.rotation is not None and report.rotation.check["error"] < 1e-4


def test_evaluate_checks_its_options_like_the_command_line(tiny_models):
    """``evaluate``'s keyword arguments are ``EvalOptions``: type and value checked before
    any work."""
    with pytest.raises(TypeError, match=r"^progress must be True or False"):
        qronos_onnx.evaluate(tiny_models("nokv"), progress="no")
    with pytest.raises(QronosError, match="windows must be a positive integer"):
        qronos_onnx.evaluate(tiny_models("nokv"), windows=0)
    with pytest.raises(TypeError, match="unknown option"):
        qronos_onnx.evaluate(tiny_models("nokv"), window=3)


def test_the_options_reference_is_generated_from_the_declarations():
    """``docs/options.md`` is the output of ``python -m qronos_onnx.reference``: regenerate
    it when an option changes (it can never drift from the code)."""
    from pathlib import Path

    from qronos_onnx.reference import markdown

    committed = Path(__file__).parent.parent / "docs" / "options.md"
    assert committed.read_text(encoding="utf-8") == markdown(), (
        "docs/options.md is stale: python -m qronos_onnx.reference > docs/options.md"
    )
