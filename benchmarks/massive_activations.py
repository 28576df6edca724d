"""A model with one massive residual channel (as ONNX Runtime issue 29849 reports for Qwen3 and
Phi-3.5), where MatMulNBits' int8 activations (``accuracy_level`` 4) cost the most: does
solving against the kernel's int8 blocks keep the quantized model's top-1 tokens?

    python benchmarks/massive_activations.py [--scale 60] [--layers 4]

The model is the test Llama (hidden 64, random weights) with channel 0 of the residual stream
made massive: the embedding adds ``scale`` to it for every token, every norm's scale of that
channel is multiplied by ``scale`` (so the normalized value is about ``scale x sqrt(64)``
times the others') and the weights reading it are divided by ``scale x scale`` in that input,
the others' norm scales multiplied by ``scale`` to undo the larger RMS: the float model
computes what it computed before up to the channel's constant offset. In every int8 block of
32 that holds channel 0, the other 31 values then get a step of about ``max|x| / 127``.

Rows (Qronos, int4 group 32; calibration and evaluation on the same kind of text, top-1
agreement with the float model and KL on held-out windows):

- solved with float activations, run at level 0 (the kernel in float);
- the same model run at level 4 (what a solver that does not see the int8 blocks gets);
- solved against the kernel's int8 blocks (the default), run at level 4.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(out: Path, layers: int, scale: float) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from models.tiny_llama import config, write_tokenizer
    from qronos_onnx.export.torch_export import export_causal_lm

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(layers, untied=True, initializer_range=0.1)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += scale
        norms = [model.model.norm]
        readers = [model.lm_head]
        for layer in model.model.layers:
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
            readers += [
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
            ]
        for norm in norms:  # RMS about scale / 8 now: others back to their size, channel 0 big
            norm.weight *= scale / 8
            norm.weight[0] *= scale
        for linear in readers:
            linear.weight[:, 0] /= scale * scale * scale / 8
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    export_causal_lm(model, path, kv_cache=False)
    write_tokenizer(out / "tokenizer.json")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=60.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    import qronos_onnx

    sys.path.insert(0, str(ROOT))
    from benchmarks.genai import set_level_4

    work = Path(tempfile.mkdtemp(prefix="qronos_massive_"))
    float_model = build(work / "float", args.layers, args.scale)
    corpus = work / "text.txt"
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "formats.md").read_text()
    corpus.write_text(text * 4)
    common = {"calib_data": corpus, "calib_windows": args.windows, "seqlen": 128}
    common.update(group_size=32, progress=False)
    rows = {}

    def score(name: str, path: Path) -> None:
        result = qronos_onnx.evaluate(
            path, reference=float_model, data=corpus, windows=8, seqlen=128, progress=False
        )
        rows[name] = {"top1_agreement": result.top1_agreement, "kl": result.kl}
        print(f"{name}: top-1 {result.top1_agreement:.3f}, KL {result.kl:.4f}", flush=True)

    level0 = work / "level0" / "model.onnx"
    qronos_onnx.optimize(float_model, level0, accuracy_level=0, **common)
    score("solved in float, run at level 0", level0)
    set_level_4(level0.parent)
    score("solved in float, run at level 4", level0)
    simulated = work / "simulated" / "model.onnx"
    qronos_onnx.optimize(float_model, simulated, **common)
    score("solved against the int8 blocks, run at level 4", simulated)
    print(json.dumps({"scale": args.scale, "layers": args.layers, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
