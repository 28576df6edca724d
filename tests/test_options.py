"""Every option declared once (``OptimizeConfig``): presets are recipe files, recipes map 1:1
to flags, and the command line, the Python API and the Olive pass are one orchestrator."""

import argparse
import dataclasses
import json
import shutil

import pytest
import yaml

import qronos_onnx
from qronos_onnx.cli import main, optimize_config, parser
from qronos_onnx.errors import QronosError
from qronos_onnx.options import PRESETS, OptimizeConfig, fields, option, recipe_path

#: The presets as the README documents them (independent of the recipe files).
DOCUMENTED = {
    "w4": {},
    "w3": {"bits": 3},
    "w2": {"bits": 2, "group_size": 32},
    "w4a4": {
        "group_size": "channel",
        "symmetric": True,
        "scale_search": "mse",
        "act_bits": 4,
        "act_clip": 0.8,
        "rotate": "hadamard",
    },
    "w8a8": {
        "bits": 7,
        "group_size": "channel",
        "symmetric": True,
        "act_bits": 8,
        "act_granularity": "tensor",
        "act_symmetric": False,
        "format": "qdq",
        "rotate": "hadamard",
    },
}


def parse(*args) -> OptimizeConfig:
    return optimize_config(parser().parse_args(["optimize", "m.onnx", "-o", "q.onnx", *args]))


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_is_its_recipe_file(preset):
    """``--w4a4``, ``--config recipes/w4a4.yaml`` and ``optimize(..., "w4a4")`` are the same
    options, the ones the README documents."""
    expected = dataclasses.replace(OptimizeConfig(), **DOCUMENTED[preset])
    flag, recipe = parse(f"--{preset}"), parse("--config", str(recipe_path(preset)))
    assert flag.replace(progress=True) == recipe.replace(progress=True) == expected
    assert OptimizeConfig.from_recipe(preset).recipe() == DOCUMENTED[preset]


#: A non-default value of every field, and the flags that give it.
EVERYTHING = {
    "bits": (3, ["--bits", "3"]),
    "group_size": (64, ["--group-size", "64"]),
    "symmetric": (True, ["--sym"]),
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
    "accuracy_level": (4, ["--accuracy-level", "4"]),
    "calib_data": ("text.txt", ["--calib-data", "text.txt"]),
    "calib_windows": (8, ["--calib-windows", "8"]),
    "seqlen": (128, ["--seqlen", "128"]),
    "tokenizer": ("tok.json", ["--tokenizer", "tok.json"]),
    "device": ("cpu", ["--device", "cpu"]),
    "report": ("r.json", ["--report", "r.json"]),
    "force": (True, ["--force"]),
    "progress": (False, ["-q"]),
    "genai_config": (True, ["--genai-config"]),
    "exporter": ("torch", ["--exporter", "torch"]),
    "export_dtype": ("fp16", ["--export-dtype", "fp16"]),
    "keep_float": (True, ["--keep-float"]),
    "scale_search": ("mse", ["--scale-search", "mse"]),
    "rotate": ("hadamard", ["--rotate", "hadamard"]),
    "rotate_seed": (7, ["--rotate-seed", "7"]),
    "magr": (0.01, ["--magr", "0.01"]),
    "act_clip": (0.9, ["--act-clip", "0.9"]),
}


def test_a_recipe_maps_one_to_one_to_flags(tmp_path):
    """A recipe file setting every option equals the same options given as flags, and a
    configuration dumped as a recipe reads back the same."""
    assert set(EVERYTHING) == {f.name for f in fields()}
    recipe = tmp_path / "all.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {k: list(v) if isinstance(v, tuple) else v for k, (v, _) in EVERYTHING.items()}
        )
    )
    flags = [a for _, args in EVERYTHING.values() for a in args]
    from_flags, from_file = parse(*flags), parse("--config", str(recipe))
    assert from_flags == from_file == OptimizeConfig(**{k: v for k, (v, _) in EVERYTHING.items()})
    from_file.dump(tmp_path / "again.yaml")
    assert OptimizeConfig.from_recipe(tmp_path / "again.yaml") == from_file
    # explicit flags override the recipe; none and channel are values too
    assert parse("--w4a4", "--group-size", "32", "--act-bits", "none").recipe() == {
        "group_size": 32,
        "symmetric": True,
        "scale_search": "mse",
        "act_clip": 0.8,
        "rotate": "hadamard",
        "progress": False,
    }


def test_every_option_reaches_the_parser_and_the_olive_pass():
    pytest.importorskip("olive")
    from qronos_onnx.olive.qronos_pass import QronosQuantization

    dests = {a.dest for a in parser()._subparsers._group_actions[0].choices["optimize"]._actions}
    assert {f.name for f in fields()} <= dests
    olive = QronosQuantization._default_config(None)
    assert {f.name for f in fields() if option(f).olive} | {"recipe", "data_config"} == set(olive)


@pytest.mark.parametrize(
    "content,message",
    [
        ("bits: 3\nflavour: mild\n", "unknown option"),
        ("[1, 2]\n", "must be a mapping"),
        ("bits: [\n", "cannot read the recipe"),
        ("bits: nine\n", "bits must be an int"),
        ("group_size: 0\n", "group_size must be a positive integer"),
    ],
)
def test_bad_recipe_files_are_one_line(tmp_path, content, message, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    with pytest.raises(QronosError, match=message):
        OptimizeConfig.from_recipe(recipe)
    code = main(["optimize", "m.onnx", "-o", str(tmp_path / "q.onnx"), "--config", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err


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
    assert {f.name for f in fields()} <= set(params)
    assert all(f.name in qronos_onnx.optimize.__doc__ for f in fields())
    assert isinstance(argparse.SUPPRESS, str)
