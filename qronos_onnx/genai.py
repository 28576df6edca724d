"""ONNX Runtime GenAI: the ``genai_config.json`` and tokenizer files that let
``onnxruntime_genai.Model(dir)`` load a model directory and generate with it.

A model from GenAI's model builder comes with a ``genai_config.json``; an output of such a
model gets a copy that names the output's file. Other exports (Optimum, ``torch.onnx``) get
one written from the graph's signature and the Hugging Face ``config.json`` beside the model
(or in the folder above, where Optimum exports usually sit). The runtime needs at least
``model.type``, ``vocab_size``, ``context_length`` and ``decoder.filename``; the input and
output names are written too, and ``past_present_share_buffer`` is off unless the graph's
attention takes a shared buffer (``GroupQueryAttention``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from .errors import QronosError
from .ir.model_io import TOKENIZER_FILE
from .ir.signature import LLMSignature

GENAI_CONFIG = "genai_config.json"

#: Files of a Hugging Face tokenizer that ONNX Runtime GenAI (or a chat front end) reads.
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
)

#: What the runtime defaults to when ``tokenizer_config.json`` is missing: it fails to load.
_MINIMAL_TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast"}


def read_genai_config(model_dir: Path) -> dict[str, Any] | None:
    """The ``genai_config.json`` of a model directory, or ``None`` when it has none.

    Raises:
        QronosError: the file is not a JSON object.
    """
    path = model_dir / GENAI_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QronosError(f"cannot read {path}: {' '.join(str(err).split())}") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise QronosError(f"{path} is not a GenAI configuration (no 'model' object)")
    if not isinstance(config["model"].get("decoder", {}), dict):
        raise QronosError(f"{path} is not a GenAI configuration ('model.decoder' is no object)")
    return config


def for_output(config: Mapping[str, Any], filename: str) -> dict[str, Any]:
    """``config`` (an input's ``genai_config.json``) for an output written as ``filename``."""
    out = copy.deepcopy(dict(config))
    out["model"].setdefault("decoder", {})["filename"] = filename
    return out


def hf_config(model_path: Path) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a model: beside it, or in the folder above (where an
    Optimum export into ``CHECKPOINT/onnx`` finds it); ``{}`` when there is none."""
    for folder in (model_path.parent, model_path.parent.parent):
        path = folder / "config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                return data
    return {}


def write_config_for(
    model: ir.Model, signature: LLMSignature, model_path: Path, filename: str
) -> dict[str, Any]:
    """A ``genai_config.json`` for a model that came without one (Optimum, ``torch.onnx``).

    Raises:
        QronosError: the graph has no KV cache (GenAI feeds one token at a time and needs one),
            or the vocabulary size is not known.
    """
    if not signature.past:
        raise QronosError(
            "ONNX Runtime GenAI needs a model with a KV cache (inputs "
            "past_key_values.N.key/value); export it with one"
        )
    hf = hf_config(model_path)
    vocab = signature.vocab or hf.get("vocab_size")
    if not vocab:
        raise QronosError(
            "the vocabulary size is neither in the graph nor in a config.json "
            "beside the model; cannot write genai_config.json"
        )
    first = signature.past[0]
    heads = hf.get("num_attention_heads") or first.kv_heads
    inputs = {
        "input_ids": signature.input_ids,
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    if signature.attention_mask:
        inputs["attention_mask"] = signature.attention_mask
    if signature.position_ids:
        inputs["position_ids"] = signature.position_ids
    decoder = {
        "filename": filename,
        "head_size": first.head_dim,
        "hidden_size": hf.get("hidden_size", heads * first.head_dim),
        "num_attention_heads": heads,
        "num_key_value_heads": first.kv_heads,
        "num_hidden_layers": len(signature.past) // 2,
        "inputs": inputs,
        "outputs": {
            "logits": signature.logits,
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    context = hf.get("max_position_embeddings") or signature.positions or 2048
    share = any(n.op_type == "GroupQueryAttention" for n in model.graph)
    tokens = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    return {
        "model": {
            "type": hf.get("model_type", "decoder"),
            "vocab_size": int(vocab),
            "context_length": int(context),
            **tokens,
            "decoder": decoder,
        },
        "search": {
            "do_sample": False,
            "max_length": int(context),
            "past_present_share_buffer": share,
        },
    }


def tokenizer_sources(model_path: Path, tokenizer: Path | None) -> dict[str, Path]:
    """The tokenizer files to copy beside an output, by name: those of ``tokenizer`` (a file or
    a directory) or, without one, the ones beside the model or in the folder above."""
    if tokenizer is not None:
        folders = [tokenizer if tokenizer.is_dir() else tokenizer.parent]
    else:
        folders = [model_path.parent, model_path.parent.parent]
    for folder in folders:
        found = {n: folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}
        if TOKENIZER_FILE in found:
            return found
    return {}


def minimal_tokenizer_config() -> str:
    """A ``tokenizer_config.json`` for a tokenizer that came without one (GenAI refuses to
    load a tokenizer without it)."""
    return json.dumps(_MINIMAL_TOKENIZER_CONFIG) + "\n"
