"""ONNX Runtime GenAI: models from its model builder in, GenAI-ready models out, Optimum
exports, and a Hugging Face checkpoint quantized in one step."""

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qronos_onnx
from qronos_onnx.cli import main
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.packing import NBitsTensors, from_matmulnbits
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.ir.sizes import stored_weights
from tests.reference import mlas_int8_blocks

og = pytest.importorskip("onnxruntime_genai")

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111]  # "Hello wo" in the byte vocabulary
FAST = ["--group-size", "32", "--calib-windows", "4", "--seqlen", "64", "-q"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("genai_corpus") / "text.txt"
    path.write_text(" ".join(["the quantized layers of a model run on onnx runtime"] * 600))
    return path


def generate(model_dir, tokens=6):
    """Greedy tokens from ONNX Runtime GenAI after ``PROMPT``."""
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    length = len(PROMPT) + tokens  # no stop at an end token: the models are random
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def teacher_forced_argmax(model_path, tokens):
    """The most likely next token at every position of ``PROMPT + tokens``, computed by plain
    ONNX Runtime on the whole sequence at once (an empty cache): what greedy decoding must
    have produced. The end token is left out where ``genai_config.json`` names one, as
    ``generate``'s ``min_length`` keeps GenAI from choosing it."""
    signature = detect_signature(load_model(model_path))
    ids = np.array([PROMPT + tokens[:-1]], np.int64)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], signature.feed(ids))[0][0][len(PROMPT) - 1 :]
    config = model_path.parent / "genai_config.json"
    if config.is_file():
        eos = json.loads(config.read_text())["model"].get("eos_token_id")
        logits[:, np.asarray([] if eos is None else eos, np.int64).reshape(-1)] = -np.inf
    return [int(t) for t in logits.argmax(-1)]


def test_builder_models_are_read(builder_model, capsys):
    """The builder's graph: a symbolic KV head size, GroupQueryAttention, a fused QKV, no
    position_ids, the embedding a Transpose of the lm_head weight."""
    model = load_model(builder_model)
    signature = detect_signature(model)
    assert signature.position_ids is None
    assert [(p.kv_heads, p.head_dim) for p in signature.past] == [(2, 16)] * 4
    assert main(["inspect", str(builder_model), "--lm-head"]) == 0
    listing = capsys.readouterr().out
    assert "targets: 11 in 9 groups" in listing
    assert "model.layers.0.attn.qkv_proj [128x64] (q 0:64, k 64:96, v 96:128)" in listing
    assert "lm_head [260x64]" in listing


def test_a_builder_model_quantized_runs_in_genai(builder_model, tmp_path, corpus):
    """--w4 on the builder's model: the report names the q/k/v parts of the fused projection,
    one layer computes numpy's int8 blocks of A (accuracy_level 4) @ dequant(B), the
    embedding reads the lm_head's codes, and the output directory (with its own
    genai_config.json) loads in ONNX Runtime GenAI, whose greedy tokens are the argmax of
    the written model's own logits."""
    out = tmp_path / "q"
    args = ["optimize", str(builder_model), "-o", str(out / "model.onnx"), "--calib-data"]
    assert main([*args, str(corpus), *FAST]) == 0
    report = json.loads((out / "model.report.json").read_text())
    qkv = next(t for t in report["targets"] if t["name"] == "model.layers.0.attn.qkv_proj")
    assert qkv["parts"] == {"q": [0, 64], "k": [64, 96], "v": [96, 128]}
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    # one layer against numpy
    proto = onnx.load(str(out / "model.onnx"))
    node = next(n for n in proto.graph.node if n.name == "/model/layers.1/mlp/down_proj/MatMul")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    inits = {t.name: numpy_helper.to_array(t, str(out)) for t in proto.graph.initializer}
    assert len(node.input) < 4 or not node.input[3]  # symmetric by default: no zero points
    t = NBitsTensors(
        inits[node.input[1]],
        inits[node.input[2]],
        None,
        attrs["K"],
        attrs["N"],
        attrs["bits"],
        attrs["block_size"],
    )
    codes, scales, _ = from_matmulnbits(t, symmetric=True)
    group = attrs["block_size"]
    weight = codes.astype(np.float32) * np.repeat(scales, group, 1)[:, : attrs["K"]]
    proto.graph.output.extend(
        [onnx.ValueInfoProto(name=node.input[0]), onnx.ValueInfoProto(name=node.output[0])]
    )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = detect_signature(load_model(out / "model.onnx")).feed(np.array([PROMPT]))
    a, y = session.run([node.input[0], node.output[0]], feed)
    assert attrs["accuracy_level"] == 4
    blocks = mlas_int8_blocks(a, group).astype(np.float64)
    np.testing.assert_allclose(y, blocks @ weight.T, rtol=1e-4, atol=1e-4 * np.abs(y).max())
    assert "GatherBlockQuantized" in {n.op_type for n in proto.graph.node}
    tokens = generate(out)
    assert len(tokens) == 6 and tokens == teacher_forced_argmax(out / "model.onnx", tokens)


def test_an_int8_lm_head_of_a_builder_model(builder_model, tmp_path, corpus):
    """--lm-head int8 on the builder's shared weight: the lm_head int8 per channel (one block
    of 64), the embedding a GatherBlockQuantized of the same codes (no float table, no
    Transpose), and GenAI still runs the result."""
    out = tmp_path / "q"
    assert (
        main(
            [
                "optimize",
                str(builder_model),
                "-o",
                str(out / "model.onnx"),
                "--calib-data",
                str(corpus),
                "--lm-head",
                "int8",
                *FAST,
            ]
        )
        == 0
    )
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 11 and "GatherBlockQuantized" in ops
    inits = onnx.load(str(out / "model.onnx")).graph.initializer
    assert not [t.name for t in inits if sorted(t.dims) == [64, 260]]  # no float table left
    assert len(generate(out)) == 6


def test_a_size_budget_on_a_builder_model_runs_in_genai(builder_model, tmp_path, corpus):
    """--w3mix on the builder's model: MatMulNBits of several widths (the packed QKV one
    choice), the lm_head at 4 or 8 bits with the embedding reading its codes, the stored
    sizes as planned, and GenAI's greedy tokens the argmax of the model's own logits."""
    out = tmp_path / "q"
    args = ["optimize", str(builder_model), "-o", str(out / "model.onnx"), "--w3mix"]
    assert main([*args, "--calib-data", str(corpus), *FAST]) == 0
    report = json.loads((out / "model.report.json").read_text())
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    widths = {
        onnx.helper.get_attribute_value(a)
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    }
    assert len(widths) > 1
    assert "GatherBlockQuantized" in {n.op_type for n in proto.graph.node}
    head = next(u for u in report["budget"]["units"] if u["targets"] == ["lm_head"])
    assert head["candidates"][head["choice"]]["grid"]["bits"] in (4, 8)
    stored = sum(w.bytes for w in stored_weights(ir.load(out / "model.onnx")))
    assert stored == report["budget"]["used_bytes"] <= report["budget"]["budget_bytes"]
    tokens = generate(out)
    assert len(tokens) == 6 and tokens == teacher_forced_argmax(out / "model.onnx", tokens)


def test_a_torch_export_gets_a_genai_config_on_request(tiny_models, tmp_path, corpus):
    """--genai-config for a torch.onnx export (no genai_config.json of its own): the output
    runs in GenAI, greedy tokens equal to the written model's argmax."""
    out = tmp_path / "q"
    assert (
        main(
            [
                "optimize",
                str(tiny_models("kv")),
                "-o",
                str(out / "model.onnx"),
                "--calib-data",
                str(corpus),
                "--genai-config",
                *FAST,
            ]
        )
        == 0
    )
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tokens = generate(out)
    assert tokens == teacher_forced_argmax(out / "model.onnx", tokens)


def test_an_optimum_export_finds_its_tokenizer_above_it(tmp_path, corpus):
    """The committed Optimum export (tests/fixtures/make_optimum_fixture.py): optimize and eval
    work, the tokenizer found in the checkpoint folder above the ONNX folder."""
    fixture = tmp_path / "optimum-tiny"
    shutil.copytree(qronos_onnx.__path__[0] + "/../tests/fixtures/optimum-tiny", fixture)
    assert not (fixture / "onnx" / "tokenizer.json").exists()
    out = tmp_path / "q" / "model.onnx"
    report = qronos_onnx.optimize(
        fixture / "onnx" / "model.onnx",
        out,
        calib_data=corpus,
        group_size=32,
        calib_windows=4,
        seqlen=64,
        genai_config=True,
        progress=False,
    )
    assert report.totals.targets == 15  # 2 x 7 layers and the lm_head
    assert (out.parent / "tokenizer.json").read_bytes() == (fixture / "tokenizer.json").read_bytes()
    result = qronos_onnx.evaluate(
        out,
        reference=fixture / "onnx" / "model.onnx",
        data=corpus,
        windows=2,
        seqlen=64,
        progress=False,
    )
    # int4 embedding and lm_head of a random 64-wide model cost it most of that (0.85 with
    # them float)
    assert result.top1_agreement > 0.3
    assert len(generate(out.parent)) == 6


def test_export_then_optimize_and_in_one_step(checkpoint, tmp_path, corpus):
    """`export` (torch.onnx here) then `optimize`, and `optimize CHECKPOINT -o DIR` (the GenAI
    builder, the float export kept with --keep-float): both outputs run in GenAI."""
    assert (
        main(["export", str(checkpoint), "-o", str(tmp_path / "float"), "--exporter", "torch"]) == 0
    )
    assert (tmp_path / "float" / "genai_config.json").is_file()
    assert (
        main(
            [
                "optimize",
                str(tmp_path / "float" / "model.onnx"),
                "-o",
                str(tmp_path / "q" / "model.onnx"),
                "--calib-data",
                str(corpus),
                *FAST,
            ]
        )
        == 0
    )
    assert len(generate(tmp_path / "q")) == 6
    assert (
        main(
            [
                "optimize",
                str(checkpoint),
                "-o",
                str(tmp_path / "one"),
                "--keep-float",
                "--calib-data",
                str(corpus),
                *FAST,
            ]
        )
        == 0
    )
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "float"} <= {
        p.name for p in (tmp_path / "one").iterdir()
    }
    assert len(generate(tmp_path / "one")) == 6
    assert (
        main(
            [
                "optimize",
                str(checkpoint),
                "-o",
                str(tmp_path / "two"),
                "--calib-data",
                str(corpus),
                *FAST,
            ]
        )
        == 0
    )
    assert not (tmp_path / "two" / "float").exists()
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]


def test_an_already_quantized_model_is_refused_before_any_tokenizing(
    tmp_path, tiny_models, monkeypatch, capsys
):
    out = tmp_path / "q.onnx"
    assert (
        main(
            [
                "optimize",
                str(tiny_models("nokv")),
                "-o",
                str(out),
                "--algo",
                "rtn",
                "--group-size",
                "32",
            ]
        )
        == 0
    )
    from qronos_onnx.calibration import data

    def never(*args, **kwargs):
        raise AssertionError("tokenized before refusing")

    monkeypatch.setattr(data, "load_tokenizer", never)
    assert main(["optimize", str(out), "-o", str(tmp_path / "again.onnx")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_the_olive_pass_takes_a_model_builder_output(builder_model, tmp_path, corpus):
    """A GenAI model as Olive's ModelBuilder hands it over (a folder, the genai_config.json
    and tokenizer among the model's additional files): the pass writes a GenAI-ready folder
    and lists its own files for Olive to carry on."""
    pytest.importorskip("olive")
    from olive.model import ONNXModelHandler
    from olive.resource_path import LocalFolder

    from qronos_onnx.olive.qronos_pass import QronosQuantization

    folder = builder_model.parent
    given = ONNXModelHandler(
        model_path=LocalFolder({"path": folder}),
        onnx_file_name="model.onnx",
        model_attributes={
            "additional_files": [str(folder / n) for n in ("genai_config.json", "tokenizer.json")]
        },
    )
    from olive.hardware.accelerator import AcceleratorSpec

    cpu = AcceleratorSpec(accelerator_type="cpu", execution_provider="CPUExecutionProvider")
    config = QronosQuantization.generate_config(
        cpu, {"group_size": 32, "calib_data": str(corpus), "calib_windows": 4, "seqlen": 64}
    )
    out = QronosQuantization(cpu, config)._run_for_config(given, config, str(tmp_path / "out"))
    files = {p.split("/")[-1] for p in out.model_attributes["additional_files"]}
    assert {"genai_config.json", "tokenizer.json", "model.report.json"} <= files
    assert len(generate(tmp_path / "out")) == 6


def test_a_torch_export_folder_is_a_model_not_a_checkpoint(checkpoint, tmp_path, corpus):
    """``export --exporter torch`` copies the checkpoint's config.json beside model.onnx: the
    folder is then the model's, and ``optimize FOLDER`` quantizes that model."""
    float_dir = tmp_path / "float"
    assert main(["export", str(checkpoint), "-o", str(float_dir), "--exporter", "torch"]) == 0
    assert (float_dir / "config.json").is_file()
    out = tmp_path / "q" / "model.onnx"
    assert (
        main(["optimize", str(float_dir), "-o", str(out), "--calib-data", str(corpus), *FAST]) == 0
    )
    report = json.loads(out.with_name("model.report.json").read_text())
    assert report["model"] == str(float_dir / "model.onnx")


def test_a_checkpoint_without_a_tokenizer_falls_back_to_torch(checkpoint, tmp_path, capsys):
    """The builder needs a tokenizer; without one, ``auto`` says why and exports with
    torch.onnx, which does not."""
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    for path in bare.iterdir():
        if "token" in path.name:
            path.unlink()
    assert main(["export", str(bare), "-o", str(tmp_path / "float")]) == 0
    captured = capsys.readouterr()
    assert "the checkpoint has no tokenizer files" in captured.err
    assert "exporting with torch.onnx instead" in captured.err
    assert "(torch.onnx)" in captured.out
    assert (tmp_path / "float" / "model.onnx").is_file()


def test_exporting_into_the_checkpoint_folder_is_refused_before_any_work(
    checkpoint, tmp_path, capsys
):
    folder = tmp_path / "ck"
    shutil.copytree(checkpoint, folder)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["export", str(folder), "-o", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is not a new or empty folder" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_failed_run_on_a_checkpoint_leaves_no_output_folder(checkpoint, tmp_path, capsys):
    """The checkpoint is exported, then the run fails (no such calibration text): the output
    folder it made for the export is gone again."""
    out = tmp_path / "q"
    args = ["optimize", str(checkpoint), "-o", str(out), "--calib-data", str(tmp_path / "no.txt")]
    assert main([*args, "--exporter", "torch", "-q"]) == 2
    assert "no.txt not found" in capsys.readouterr().err
    assert not out.exists()
