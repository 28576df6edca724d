"""Build a random tiny Llama as ONNX, in seconds, for the tests.

    python models/tiny_llama.py OUT_DIR [--layers 2] [--kv-cache] [--untied]
    python models/tiny_llama.py OUT_DIR --checkpoint     (a Hugging Face checkpoint)

Writes ``OUT_DIR/model.onnx`` with external data (``model.onnx.data``) and a byte-level
``tokenizer.json`` (vocabulary 256). The export is ``torch.onnx.export(dynamo=True)``
(``qronos_onnx.export.torch_export``) with Optimum's input and output names: ``input_ids``,
``attention_mask``, ``position_ids`` (and ``past_key_values.N.key/value`` with ``--kv-cache``);
``logits`` (and ``present.N.*``). ``build_checkpoint`` writes a random tiny Llama as a Hugging
Face checkpoint instead (with 4 special tokens), the input of ``qronos-onnx export``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qronos_onnx.export.torch_export import export_causal_lm

VOCAB = 256


def config(layers: int = 2, untied: bool = False, **overrides) -> LlamaConfig:
    """The tiny Llama's configuration (``overrides``: other ``LlamaConfig`` fields)."""
    fields = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": not untied,
        "rms_norm_eps": 1e-5,
    }
    return LlamaConfig(**{**fields, **overrides})


def build(
    out_dir: str | Path,
    layers: int = 2,
    kv_cache: bool = False,
    untied: bool = False,
    seed: int = 0,
) -> Path:
    """Export a random model and a tokenizer to ``out_dir``; returns the model path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = config(layers, untied)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # give the random model some outlier channels
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.rand_like(p))
                p[torch.randperm(p.numel())[:3]] *= 4.0
    path = export_causal_lm(model, out_dir / "model.onnx", kv_cache)
    write_tokenizer(out_dir / "tokenizer.json")
    return path


def build_relative(out_dir: str | Path, family: str, kv_cache: bool = True, seed: int = 0) -> Path:
    """A relative of the tiny Llama for the rotation tests, same sizes, exported like ``build``.

    ``family``: ``"gemma"`` (RMSNorm scale ``1 + w``, norm weights drawn in ``[0, 0.5)``),
    ``"gemma2"`` (also norms on the residual branches after attention and MLP), ``"gemma3"``
    (``gemma2``'s sandwich norms, q/k norms, alternating sliding and full attention, the
    embedding scaled by ``sqrt(64)``; and Gemma-3-270M's two properties that matter for
    rotations: norm scales spread up to tens, and a massive residual channel, ``MASSIVE``,
    that every pre-norm damps to (near) zero), ``"fp16"`` or ``"bf16"`` (the Llama in float16,
    bfloat16). Returns the model path."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GemmaConfig,
        GemmaForCausalLM,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sizes = config().to_dict()
    common = {k: sizes[k] for k in ("vocab_size", "hidden_size", "intermediate_size")}
    common.update(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    model: torch.nn.Module
    if family == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**common))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(0.5 * torch.rand_like(p))
    elif family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, sliding_window=64))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(
                **common,
                query_pre_attn_scalar=16,
                sliding_window=16,
                layer_types=["sliding_attention", "full_attention"],
                rms_norm_eps=1e-6,
            )
        )
        _massive_channel(model)
    elif family == "fp16":
        model = LlamaForCausalLM(config()).half()
    elif family == "bf16":
        model = LlamaForCausalLM(config()).to(torch.bfloat16)
    else:
        raise ValueError(f"unknown family {family!r}")
    path = export_causal_lm(model.eval(), out_dir / "model.onnx", kv_cache)
    write_tokenizer(out_dir / "tokenizer.json")
    return path


#: The residual channel of the tiny Gemma 3 that carries a massive activation.
MASSIVE = 7


def _massive_channel(model: torch.nn.Module) -> None:
    """Gemma-3-270M's traits, in a random Gemma 3: norm scales ``1 + w`` in ``[1, 3)`` with a
    few of 10 to 30, and a residual channel of 30 * sqrt(64) = 240 in every token that the
    input norms damp to 0.1 and the feed-forward and final norms to exactly 0 (the real
    model's pre_feedforward_layernorm weights of that channel are -1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(2.0 * torch.rand_like(p))
                p[torch.randperm(p.numel())[:3]] = 10.0 + 20.0 * torch.rand(3)
        model.model.embed_tokens.weight[:, MASSIVE] = 30.0
        for layer in model.model.layers:
            layer.input_layernorm.weight[MASSIVE] = -0.9
            layer.pre_feedforward_layernorm.weight[MASSIVE] = -1.0
        model.model.norm.weight[MASSIVE] = -1.0


def build_checkpoint(
    out_dir: str | Path, layers: int = 2, seed: int = 0, untied: bool = False
) -> Path:
    """A random tiny Llama as a Hugging Face checkpoint (the input of ``qronos-onnx export``
    and of ONNX Runtime GenAI's model builder): vocabulary 256 bytes + 4 specials (``<s>``,
    ``</s>``, ``<pad>``, ``<unk>``), weights with a wider spread than a fresh initialisation so
    that greedy generation does not repeat one token; ``untied``: a separate lm_head weight.
    Returns ``out_dir``."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    tok = byte_tokenizer(specials)
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(out_dir)
    torch.manual_seed(seed)
    cfg = config(
        layers,
        untied,
        vocab_size=VOCAB + len(specials),
        initializer_range=0.3,
        bos_token_id=VOCAB,
        eos_token_id=VOCAB + 1,
        pad_token_id=VOCAB + 2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


def byte_tokenizer(specials=()):
    """A byte-level BPE without merges: one token per byte (ids 0..255), then ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def write_tokenizer(path: str | Path) -> None:
    """The byte-level tokenizer of the ONNX test model, as ``tokenizer.json``."""
    byte_tokenizer().save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--kv-cache", action="store_true")
    ap.add_argument("--untied", action="store_true")
    ap.add_argument(
        "--checkpoint",
        action="store_true",
        help="write a Hugging Face checkpoint instead of the ONNX model",
    )
    args = ap.parse_args()
    if args.checkpoint:
        print(build_checkpoint(args.out_dir, args.layers, untied=args.untied))
    else:
        print(build(args.out_dir, args.layers, args.kv_cache, args.untied))


if __name__ == "__main__":
    main()
