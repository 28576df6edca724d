"""The Olive pass, run by Olive's own workflow runner on the tiny Llama."""

import json
import shutil
from pathlib import Path

import pytest

olive_workflows = pytest.importorskip("olive.workflows")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import yaml  # noqa: E402

from qronos_onnx.ir.model_io import load_model  # noqa: E402
from qronos_onnx.ir.signature import detect_signature  # noqa: E402
from qronos_onnx.olive.registry import REGISTRY, merged_package_config  # noqa: E402
from tests.helpers import random_samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "passes" / "qronos_tiny_llama.json"


def test_package_config_file_is_the_registry():
    assert json.loads((ROOT / "passes" / "olive_config.json").read_text()) == REGISTRY


def test_yaml_and_json_workflows_agree():
    assert yaml.safe_load((ROOT / "passes" / "qronos_tiny_llama.yaml").read_text()) == json.loads(
        WORKFLOW.read_text()
    )


def test_merged_package_config_keeps_olives_passes():
    from olive.package_config import OlivePackageConfig

    merged = OlivePackageConfig.model_validate(merged_package_config())
    assert "qronosquantization" in merged.passes and "onnxblockwisertnquantization" in merged.passes


@pytest.mark.slow
def test_example_workflow_runs_through_olive(tiny_models, tmp_path, monkeypatch):
    shutil.copytree(tiny_models("nokv").parent, tmp_path / "models" / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    config = json.loads(WORKFLOW.read_text())
    config["passes"]["qronos"].update(calib_windows=2, seqlen=64)  # keep the test quick
    olive_workflows.run(config, package_config=merged_package_config())
    out = tmp_path / "olive-output" / "qronos-tiny-llama"
    model = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 15 and "MatMul" in ops  # attention products stay
    report = json.loads((out / "model.report.json").read_text())
    assert report["totals"]["targets"] == 15 and report["targets"][0]["algorithm"] == "qronos"
    feed = random_samples(detect_signature(load_model(out / "model.onnx")), count=1)[0]
    logits = ort.InferenceSession(str(out / "model.onnx")).run(["logits"], feed)[0]
    assert logits.shape[-1] == 256


def test_olive_config_command_keeps_existing_files(tmp_path, capsys):
    from qronos_onnx.cli import main

    out = tmp_path / "sub" / "ours.json"
    assert main(["olive-config", "--ours-only", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == REGISTRY
    assert "wrote" in capsys.readouterr().out
    out.write_text("mine")
    assert main(["olive-config", "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["olive-config", "-o", str(out), "--force"]) == 0
    assert "QronosQuantization" in json.dumps(json.loads(out.read_text()))


HF_WORKFLOW = ROOT / "passes" / "qronos_hf_genai.json"


def test_the_checkpoint_workflow_chains_model_builder_and_our_pass():
    """The example that starts from a Hugging Face checkpoint: ModelBuilder (float32), then
    QronosQuantization, parsed by Olive's own workflow schema."""
    from olive.workflows.run.config import RunConfig

    config = RunConfig.parse_file_or_obj(json.loads(HF_WORKFLOW.read_text()))
    passes = {name: [p.type for p in group] for name, group in config.passes.items()}
    assert passes == {"builder": ["modelbuilder"], "qronos": ["qronosquantization"]}
    assert config.passes["builder"][0].config["precision"] == "fp32"


@pytest.mark.slow
def test_the_checkpoint_workflow_runs_through_olive(tmp_path, monkeypatch):
    """Run only where Olive's ModelBuilder pass works with the installed onnxruntime-genai:
    Olive 0.13 patches a module (onnxruntime_genai.models.quantized_model) that genai removed in
    0.16 and fails with 0.13-0.15 too; 0.11-0.12 run it (tried), but their runtime cannot load
    the tokenizers transformers 5 saves, so the genai extra pins 0.18."""
    import onnxruntime_genai
    from packaging.version import Version

    if Version(onnxruntime_genai.__version__) >= Version("0.13"):
        pytest.skip(
            f"Olive's ModelBuilder pass fails with onnxruntime-genai "
            f"{onnxruntime_genai.__version__} (works with < 0.13)"
        )
    from models import tiny_llama

    tiny_llama.build_checkpoint(tmp_path / "models" / "tiny-hf")
    monkeypatch.chdir(tmp_path)
    config = json.loads(HF_WORKFLOW.read_text())
    config["passes"]["qronos"].update(calib_windows=2, seqlen=64)
    olive_workflows.run(config, package_config=merged_package_config())
    out = tmp_path / "olive-output" / "qronos-tiny-hf"
    assert [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node].count(
        "MatMulNBits"
    ) == 10
