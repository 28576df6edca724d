"""Build a random tiny Llama as ONNX, in seconds, for the tests.

    python models/tiny_llama.py OUT_DIR [--layers 2] [--kv-cache] [--untied]

Writes ``OUT_DIR/model.onnx`` with external data (``model.onnx.data``) and a byte-level
``tokenizer.json`` (vocabulary 256 + specials). The export is ``torch.onnx.export(dynamo=True)``
with Optimum's input and output names: ``input_ids``, ``attention_mask``, ``position_ids``
(and ``past_key_values.N.key/value`` with ``--kv-cache``); ``logits`` (and ``present.N.*``).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

VOCAB = 256


class _Export(LlamaForCausalLM):
    """Flat tensors in and out, so that the ONNX graph has named inputs and outputs."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = None
        if past:
            cache = DynamicCache()
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=bool(past),
        )
        if not past:
            return out.logits
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def config(layers: int = 2, untied: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=not untied,
        rms_norm_eps=1e-5,
    )


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
    path = export(cfg, model.state_dict(), out_dir / "model.onnx", kv_cache)
    write_tokenizer(out_dir / "tokenizer.json")
    return path


def export(cfg: LlamaConfig, state_dict: dict, path: Path, kv_cache: bool) -> Path:
    """``torch.onnx.export`` (dynamo) of a Llama with Optimum's input and output names, weights
    in ``<path>.data``."""
    model = _Export(cfg).eval()
    model.load_state_dict(state_dict)
    batch, seq, past_len = 1, 8, 3
    layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    args = [
        torch.randint(0, cfg.vocab_size, (batch, seq)),
        torch.ones(batch, seq + (past_len if kv_cache else 0), dtype=torch.int64),
        torch.arange(seq)[None] + (past_len if kv_cache else 0),
    ]
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_out = ["logits"]
    dynamic = [{0: "batch", 1: "seq"}, {0: "batch", 1: "total"}, {0: "batch", 1: "seq"}]
    if kv_cache:
        kv_shape = (batch, cfg.num_key_value_heads, past_len, head_dim)
        args += [torch.randn(kv_shape) for _ in range(2 * layers)]
        for i in range(layers):
            names_in += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            names_out += [f"present.{i}.key", f"present.{i}.value"]
        dynamic.append(tuple({0: "batch", 2: "past"} for _ in range(2 * layers)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(args),
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_shapes=tuple(dynamic),
            dynamo=True,
            optimize=True,
            external_data=True,
            verbose=False,
        )
    return path


def write_tokenizer(path: str | Path) -> None:
    """A byte-level BPE tokenizer without merges: one token per byte (ids 0..255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--kv-cache", action="store_true")
    ap.add_argument("--untied", action="store_true")
    args = ap.parse_args()
    print(build(args.out_dir, args.layers, args.kv_cache, args.untied))


if __name__ == "__main__":
    main()
