"""``benchmarks/gpu_check.py`` runs as it is: here on the CPU, on a tiny shape."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_check_runs_on_the_cpu_and_reports_memory_and_time(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    shape = ["--hidden", "256", "--intermediate", "512", "--layers", "2", "--vocab", "300"]
    summary = gpu_check.main(
        ["--device", "cpu", *shape, "--windows", "2", "--seqlen", "32", "--out", str(tmp_path)]
    )
    assert summary["device"] == "cpu" and summary["providers"] == ["CPUExecutionProvider"]
    assert summary["peak_gpu_bytes"] is None
    assert summary["peak_host_anon_bytes"] > 100 * 2**20  # python, torch and ONNX Runtime
    assert set(summary["solve_seconds_per_layer"]) == {"0", "1", "lm_head"}
    assert '"device": "cpu"' in capsys.readouterr().out
