"""``torch.onnx.export`` (dynamo) of a Hugging Face causal LM with the names ONNX Runtime's
tools and this project expect: inputs ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.N.key`` / ``.value`` (``[batch, kv_heads, past, head_dim]``), outputs
``logits`` and ``present.N.key`` / ``.value``; weights in ``<model>.data``.

The model keeps its class (the export only swaps in a subclass whose ``forward`` takes and
returns flat tensors), so the exporter records the module paths (``model.layers.0.mlp.up_proj``)
that name the layers in reports and patterns.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from qronos_onnx.errors import QronosError

from .builder import MODEL_FILE


def flat_io(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a transformers ``*ForCausalLM``), with a ``forward(input_ids, attention_mask,
    position_ids, *past)`` that returns ``logits`` (and the flattened new cache)."""
    from transformers import DynamicCache

    base = type(model)

    class Flat(base):  # type: ignore[valid-type,misc]
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

    Flat.__name__ = Flat.__qualname__ = base.__name__
    model.__class__ = Flat
    return model


def export_causal_lm(model: torch.nn.Module, path: str | Path, kv_cache: bool = True) -> Path:
    """Export ``model`` to ``path`` (+ ``<path>.data``); returns ``path``.

    The example inputs are a batch of 1 x 8 tokens after 3 cached ones; batch, sequence and
    cache lengths are dynamic in the graph.
    """
    path = Path(path)
    cfg: Any = model.config
    model = flat_io(model.eval())
    batch, seq, past_len = 1, 8, 3
    layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    args = [
        torch.randint(0, cfg.vocab_size, (batch, seq)),
        torch.ones(batch, seq + (past_len if kv_cache else 0), dtype=torch.int64),
        torch.arange(seq)[None] + (past_len if kv_cache else 0),
    ]
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_out = ["logits"]
    dynamic: list = [{0: "batch", 1: "seq"}, {0: "batch", 1: "total"}, {0: "batch", 1: "seq"}]
    if kv_cache:
        args += [
            torch.randn(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers)
        ]
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


def export_checkpoint_with_torch(checkpoint: Path, out: Path, dtype: str) -> None:
    """``torch.onnx`` of a checkpoint's transformers model into ``out``, with its tokenizer
    files, ``config.json`` and a ``genai_config.json``.

    Raises:
        QronosError: transformers cannot load the checkpoint.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from qronos_onnx.genai import GENAI_CONFIG, TOKENIZER_FILES, write_config_for
    from qronos_onnx.ir.model_io import load_model
    from qronos_onnx.ir.signature import detect_signature

    hf_logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notices about torchvision ops
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=torch.float16 if dtype == "fp16" else torch.float32
        )
    except Exception as err:  # transformers raises many types for unloadable checkpoints
        raise QronosError(
            f"transformers cannot load {checkpoint}: {' '.join(str(err).split())}"
        ) from err
    export_causal_lm(model, out / MODEL_FILE)
    for name in (*TOKENIZER_FILES, "config.json", "generation_config.json"):
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    onnx_model = load_model(out / MODEL_FILE)
    config = write_config_for(
        onnx_model, detect_signature(onnx_model), out / MODEL_FILE, MODEL_FILE
    )
    (out / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
