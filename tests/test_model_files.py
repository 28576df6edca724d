"""Model files in and out: loading (external data checks, node names), refusing bad output
places before any work, and placing model, data and report all or nothing."""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qronos_onnx.errors import QronosError
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.signature import detect_signature
from qronos_onnx.options import DEFAULT_REPORT, Options
from qronos_onnx.pipeline import run
from qronos_onnx.writers import FileWriter
from tests.helpers import random_samples


def write(model_path, output, force=False, report=DEFAULT_REPORT, data=None, **options):
    """The orchestrator with the file writer (RTN, group 16 unless ``options`` say otherwise):
    what ``optimize`` does, with the report name and feeds given directly."""
    config = Options(**{"algo": "rtn", "group_size": 16, "progress": False, **options})
    return run(model_path, config, FileWriter(output, force, report), data)


# -- clear errors, nothing written ---------------------------------------------------------


def expect_error(model_path, tmp_path, match):
    out = tmp_path / "out.onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QronosError, match=match):
        write(model_path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_non_llm_graph_is_refused(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]
    )
    onnx.save(onnx.helper.make_model(graph), tmp_path / "plain.onnx")
    expect_error(tmp_path / "plain.onnx", tmp_path, "not a decoder LLM graph")


def test_missing_external_data_is_refused(tiny_models, tmp_path):
    shutil.copy(tiny_models("nokv"), tmp_path / "model.onnx")
    expect_error(tmp_path / "model.onnx", tmp_path, "external data file .* is missing")


def test_truncated_external_data_is_refused(tiny_models, tmp_path):
    src = tiny_models("nokv")
    shutil.copy(src, tmp_path / "model.onnx")
    data = (src.parent / "model.onnx.data").read_bytes()
    (tmp_path / "model.onnx.data").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "model.onnx", tmp_path, "truncated")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_model_file_is_refused(tiny_models, tmp_path, damage):
    src = tiny_models("nokv").read_bytes()
    bad = src[: len(src) // 3] if damage == "truncate" else bytes(range(256)) * 50
    (tmp_path / "model.onnx").write_bytes(bad)
    expect_error(tmp_path / "model.onnx", tmp_path, "not a readable ONNX model")


def test_existing_output_is_not_overwritten_without_force(tiny_models, tmp_path):
    (tmp_path / "out.onnx").write_text("keep me")
    with pytest.raises(QronosError, match="exists"):
        write(tiny_models("nokv"), tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_text() == "keep me"
    with pytest.raises(QronosError, match=r"refusing to overwrite .* the input model"):
        write(tiny_models("nokv"), tiny_models("nokv"), force=True)


def test_input_data_files_and_existing_companions_are_never_overwritten(tiny_models, tmp_path):
    """The output's data file and report count as outputs: one the input model reads is refused
    even with force; an existing one needs force."""
    source = onnx.load(tiny_models("nokv"))
    onnx.save(
        source, tmp_path / "float.onnx", save_as_external_data=True, location="model.onnx.data"
    )  # the data name of an output model.onnx
    before = (tmp_path / "model.onnx.data").read_bytes()
    for force in (False, True):
        with pytest.raises(QronosError, match=r"model.onnx.data: the input model .* reads it"):
            write(tmp_path / "float.onnx", tmp_path / "model.onnx", force=force)
    assert (tmp_path / "model.onnx.data").read_bytes() == before
    assert not (tmp_path / "model.onnx").exists()
    (tmp_path / "q.report.json").write_text("an earlier run")
    with pytest.raises(QronosError, match=r"q.report.json exists"):
        write(tmp_path / "float.onnx", tmp_path / "q.onnx")
    (tmp_path / "q.onnx.data").write_text("stale")
    with pytest.raises(QronosError, match=r"q.onnx.data exists"):
        write(tmp_path / "float.onnx", tmp_path / "q.onnx", report=None)
    assert (tmp_path / "q.report.json").read_text() == "an earlier run"


@pytest.mark.parametrize(
    "output,report,message",
    [
        ("q.onnx", "../r.json", "not a plain file name"),
        ("q.onnx", "q.onnx.data", "output model's own file name"),
        ("q.onnx", "", "not a plain file name"),
        ("q.onnx", "other.onnx", "cannot name a file beside the output"),
        ("q.onnx", "tokenizer.json", "the tokenizer copied there"),
        ("q.onnx", "rdir", "is a directory; it would be replaced"),
        ("adir", "r.json", "must end in .onnx"),
        ("adir.onnx", "r.json", "is a directory"),
        ("locked/sub/q.onnx", "r.json", "permission denied"),
    ],
)
def test_bad_output_places_are_refused_before_any_work(
    tiny_models, tmp_path, output, report, message
):
    (tmp_path / "adir.onnx").mkdir()
    (tmp_path / "rdir").mkdir()
    (tmp_path / "locked").mkdir(mode=0o500)
    if os.access(tmp_path / "locked", os.W_OK) and "locked" in output:
        pytest.skip("running as a user who can write anywhere")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(QronosError, match=message):
        write(tiny_models("nokv"), tmp_path / output, report=report)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def failing_replace(monkeypatch, fails):
    """Make ``os.replace`` raise ``fails[(step, file name)]`` for the moves of ``_place``:
    step ``aside`` (an existing file into ``old/``), ``place`` (a new file from ``new/``) or
    ``restore`` (back from ``old/``)."""
    real_replace = os.replace

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        step = {"old": "restore", "new": "place"}.get(src.parent.name, "aside")
        error = fails.get((step, (dst if step != "aside" else src).name))
        if error is not None:
            raise error
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("step", ["aside", "place"])
@pytest.mark.parametrize("failing", ["q.onnx", "q.onnx.data", "q.report.json"])
@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_a_failed_write_leaves_the_previous_output_as_it_was(
    tiny_models, tmp_path, monkeypatch, step, failing, error
):
    """Model, data and report are placed together: when moving any of them fails (or is
    interrupted), what was placed is removed and the previous files come back, byte for byte."""
    write(tiny_models("nokv"), tmp_path / "q.onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"q.onnx", "q.onnx.data", "q.report.json", "tokenizer.json"}
    failing_replace(monkeypatch, {(step, failing): error})
    expected = QronosError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(
        expected, match="could not write .*No space left" if expected is QronosError else None
    ):
        write(tiny_models("nokv"), tmp_path / "q.onnx", force=True, bits=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_previous_files_that_cannot_be_put_back_are_kept_and_named(
    tiny_models, tmp_path, monkeypatch
):
    write(tiny_models("nokv"), tmp_path / "q.onnx")
    old_data = (tmp_path / "q.onnx.data").read_bytes()
    failing_replace(
        monkeypatch,
        {
            ("place", "q.onnx"): OSError(errno.EIO, "I/O error"),
            ("restore", "q.onnx.data"): OSError(errno.EIO, "I/O error"),
        },
    )
    with pytest.raises(
        QronosError, match=r"could not put back q.onnx.data .* previous files are in (.*)"
    ) as caught:
        write(tiny_models("nokv"), tmp_path / "q.onnx", force=True, bits=2)
    kept = Path(str(caught.value).rsplit(" in ", 1)[1])
    assert (kept / "q.onnx.data").read_bytes() == old_data
    assert {"q.onnx", "q.report.json"} <= {p.name for p in tmp_path.iterdir()}


def test_a_failed_write_removes_the_directories_it_made(tiny_models, tmp_path, monkeypatch):
    failing_replace(monkeypatch, {("place", "q.onnx"): OSError(errno.ENOSPC, "No space left")})
    with pytest.raises(QronosError, match="could not write"):
        write(tiny_models("nokv"), tmp_path / "a" / "b" / "q.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("naming", ["unnamed", "one name for all"])
def test_nodes_without_unique_names_are_quantized_like_named_ones(tiny_models, tmp_path, naming):
    """ONNX allows empty and repeated node names: the same layers are found and get the same
    codes as in the named model."""
    source = tiny_models("nokv")
    proto = onnx.load(str(source))
    for node in proto.graph.node:
        node.name = "" if naming == "unnamed" else "node"
    onnx.save(proto, tmp_path / "model.onnx")
    loaded = load_model(tmp_path / "model.onnx")
    names = [n.name for n in loaded.graph]
    assert all(names) and len(set(names)) == len(names)
    values = sorted(v.name or "" for n in loaded.graph for v in n.outputs)  # left as they were
    assert values == sorted(o for n in proto.graph.node for o in n.output)
    samples = random_samples(detect_signature(load_model(source)))
    outputs = {}
    for label, path in (("named", source), ("renamed", tmp_path / "model.onnx")):
        out = tmp_path / f"{label}.onnx"
        report = write(path, out, report=None, data=samples, algo="qronos", bits=3)
        assert report.totals.targets == 15
        q = onnx.load(str(out))
        assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == 15
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        outputs[label] = session.run(["logits"], samples[0])[0]
    np.testing.assert_array_equal(outputs["named"], outputs["renamed"])


def test_naming_nodes_leaves_optional_outputs_uncomputed(tmp_path):
    """An empty output name marks an optional output nobody computes (Dropout's mask here): only
    nodes get names on load, so it stays empty in the saved model."""
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Dropout", ["x"], ["d", ""]),
            helper.make_node("MatMul", ["d", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w],
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    from qronos_onnx.ir.model_io import write_model

    write_model(load_model(tmp_path / "m.onnx"), tmp_path / "out.onnx")
    nodes = onnx.load(str(tmp_path / "out.onnx")).graph.node
    assert [[o for o in n.output if o] for n in nodes] == [["d"], ["y"]]  # no mask computed
    assert [n.name for n in nodes] == ["Dropout_0", "MatMul_0"]
