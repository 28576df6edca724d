"""The layers stay apart: ``quant/`` is pure torch (no ONNX), ``ir/`` is pure ONNX (no torch),
and the command line's parser and the options load neither."""

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qronos_onnx"
HEAVY = ("torch", "onnx", "onnxruntime", "onnx_ir", "onnxscript")


def loaded_after(statement: str) -> list[str]:
    """The heavy libraries a fresh interpreter has loaded after ``statement``."""
    code = f"import sys; {statement}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout)


@pytest.mark.parametrize("module", sorted(p.stem for p in (PACKAGE / "quant").glob("*.py")))
def test_quant_loads_no_onnx(module):
    assert loaded_after(f"import qronos_onnx.quant.{module}") == ["torch"]


@pytest.mark.parametrize("module", sorted(p.stem for p in (PACKAGE / "ir").glob("*.py")))
def test_ir_loads_no_torch(module):
    assert "torch" not in loaded_after(f"import qronos_onnx.ir.{module}")


@pytest.mark.parametrize(
    "statement",
    [
        "import qronos_onnx.options, qronos_onnx.errors, qronos_onnx.files.placement",
        "import qronos_onnx.registry, qronos_onnx.schema, qronos_onnx.formats.base",
        "import qronos_onnx.recipes, qronos_onnx.files.lock, qronos_onnx.files.paths",
        "import qronos_onnx.cli as cli; cli.parser().parse_args(['optimize', 'm', '-o', 'q.onnx'])",
    ],
)
def test_options_and_the_parser_load_nothing_heavy(statement):
    assert loaded_after(statement) == []
