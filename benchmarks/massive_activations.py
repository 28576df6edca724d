"""A model with one massive channel in its layers' inputs (as ONNX Runtime issue 29849 reports
for Qwen3 and Phi-3.5), where MatMulNBits' int8 activations (``accuracy_level`` 4) cost the
most: does solving against the kernel's int8 blocks keep the quantized model's top-1 tokens?

    python benchmarks/massive_activations.py [--boost 50] [--layers 4]

The model is the test Llama (hidden 64, random weights of spread 0.3 so that its tokens are
not ties) with channel 0 of every norm's output made ``boost`` times larger and the weights
reading it divided by ``boost`` in that input: the float model computes exactly what it
computed before, but in the int8 block of 32 that holds channel 0 the other 31 values get a
step of ``max|x| / 127``, about ``boost / 127`` of their own size.

Rows (Qronos, weights int8 in groups of 32 by default, so that the weights' own error is small
beside the activations' (issue 29849: the nodes that flip are 8-bit); calibration and
evaluation on the same kind of text; top-1 agreement with the float model and KL on held-out
windows):

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


def build(out: Path, layers: int, boost: float) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from models.tiny_llama import config, write_tokenizer
    from qronos_onnx.export.torch_export import export_causal_lm

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(layers, untied=True, initializer_range=0.3)).eval()
    with torch.no_grad():
        pairs = [(model.model.norm, [model.lm_head])]
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            pairs.append((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]))
            pairs.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
        for norm, readers in pairs:
            norm.weight[0] *= boost
            for linear in readers:
                linear.weight[:, 0] /= boost
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    export_causal_lm(model, path, kv_cache=False)
    write_tokenizer(out / "tokenizer.json")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boost", type=float, default=50.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, default=8, help="weight bits (8: the int8 step shows)")
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    import qronos_onnx

    sys.path.insert(0, str(ROOT))
    from benchmarks.genai import set_level_4

    work = Path(tempfile.mkdtemp(prefix="qronos_massive_"))
    float_model = build(work / "float", args.layers, args.boost)
    corpus = work / "text.txt"
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "formats.md").read_text()
    corpus.write_text(text * 4)
    common = {"calib_data": corpus, "calib_windows": args.windows, "seqlen": 128}
    # the lm_head and embedding float: on a 64-wide random model their int4 error would hide
    # the activations' (the question is the layers')
    common.update(bits=args.bits, group_size=32, lm_head="skip", progress=False)
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
    setting = {"boost": args.boost, "layers": args.layers, "bits": args.bits}
    print(json.dumps({**setting, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
