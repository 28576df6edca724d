"""Recognise a decoder language model's ONNX signature (the naming of Optimum, ``torch.onnx``
and ONNX Runtime GenAI's model builder).

Inputs: ``input_ids``, ``attention_mask``, optional ``position_ids``, optional KV cache
``past_key_values.N.key`` / ``past_key_values.N.value`` (``[batch, kv_heads, past, head_dim]``;
a symbolic head size is read off the attention node, see ``ir/attention.py``).
Outputs: ``logits`` and, with a cache, ``present.N.key`` / ``present.N.value``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qronos_onnx.errors import QronosError

from .attention import cache_reader
from .values import constant, dtype_of, is_constant, name_of, static_shape

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class PastInput:
    """One KV-cache input: its name, element type and the static ``kv_heads``/``head_dim``."""

    name: str
    dtype: np.dtype
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class LLMSignature:
    """The inputs and outputs that make a graph a decoder LLM."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past: tuple[PastInput, ...]
    logits: str
    vocab: int | None = None  # token ids the graph accepts and scores (None: not static)
    positions: int | None = None  # rows of a position table gathered by position_ids (None: none)

    def check_token_ids(self, windows: np.ndarray, source: str = "the tokenizer") -> None:
        """Refuse token ids the model has no embedding row or logit for (a wrong tokenizer, or
        feeds made for another model); ``source`` names where the ids came from."""
        if np.size(windows) and int(np.min(windows)) < 0:
            raise QronosError(
                f"{source} produces token id {int(np.min(windows))}; token ids are never negative"
            )
        top = int(np.max(windows)) if np.size(windows) else -1
        if self.vocab is not None and top >= self.vocab:
            hint = (
                ": is it the model's own tokenizer? (give tokenizer)"
                if source == "the tokenizer"
                else ""
            )
            raise QronosError(
                f"{source} produces token id {top}, but the model's vocabulary has "
                f"{self.vocab} entries{hint}"
            )

    def check_seqlen(self, seqlen: int) -> None:
        """Refuse windows longer than the model's position table (ONNX Runtime would fail in a
        Gather mid-run)."""
        if self.positions is not None and seqlen > self.positions:
            raise QronosError(
                f"seqlen {seqlen} is longer than the model supports: its position "
                f"table has {self.positions} rows (use seqlen {self.positions} or "
                "less)"
            )

    def feed(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict:
        """A full feed for a batch of windows ``[batch, seq]`` with an empty (length-0) cache."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        feed = {self.input_ids: input_ids}
        if self.attention_mask is not None:
            feed[self.attention_mask] = (
                np.ones((batch, seq), np.int64)
                if attention_mask is None
                else np.asarray(attention_mask, dtype=np.int64)
            )
        if self.position_ids is not None:
            # positions count the real tokens: left padding (mask 0) does not advance them
            mask = (
                np.ones((batch, seq), np.int64)
                if self.attention_mask is None
                else feed[self.attention_mask]
            )
            feed[self.position_ids] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        for p in self.past:
            feed[p.name] = np.zeros((batch, p.kv_heads, 0, p.head_dim), dtype=p.dtype)
        return feed

    def complete(self, feed: dict) -> dict:
        """``feed`` with the LLM inputs it lacks filled in (mask of ones, positions from 0, an
        empty cache), so that feeds from any data reader run on this graph."""
        ids = np.asarray(feed[self.input_ids])
        full = self.feed(ids, feed.get(self.attention_mask) if self.attention_mask else None)
        for name, value in feed.items():
            if name in full:
                full[name] = np.asarray(value, dtype=full[name].dtype)
        return full


def detect_signature(model: ir.Model) -> LLMSignature:
    """Find the LLM signature of ``model``.

    Raises:
        QronosError: no ``input_ids`` input or no ``logits`` output, or a KV-cache input whose
            head count or head size is not static.
    """
    inputs = {name_of(v): v for v in model.graph.inputs}
    outputs = [name_of(v) for v in model.graph.outputs]
    if "input_ids" not in inputs or "logits" not in outputs:
        raise QronosError(
            "not a decoder LLM graph: expected an input 'input_ids' and an output 'logits' "
            f"(found inputs {sorted(inputs)}, outputs {outputs}); export the model with "
            "Optimum or torch.onnx using these names"
        )
    past = []
    for name, value in inputs.items():
        if _PAST.match(name):
            kv_heads, head_dim = _cache_dims(name, value)
            past.append(PastInput(name, np.dtype(dtype_of(value).numpy()), kv_heads, head_dim))
    known = {"input_ids", "attention_mask", "position_ids"} | {p.name for p in past}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise QronosError(
            f"unsupported model inputs {unknown}: a decoder LLM takes input_ids, "
            "attention_mask, position_ids and past_key_values.N.key/value"
        )
    return LLMSignature(
        input_ids="input_ids",
        attention_mask="attention_mask" if "attention_mask" in inputs else None,
        position_ids="position_ids" if "position_ids" in inputs else None,
        past=tuple(sorted(past, key=lambda p: _past_key(p.name))),
        logits="logits",
        vocab=_vocab_size(inputs["input_ids"], model.graph.outputs[outputs.index("logits")]),
        positions=(
            min(_gathered_rows(inputs["position_ids"]), default=None)
            if "position_ids" in inputs
            else None
        ),
    )


def _cache_dims(name: str, value: ir.Value) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of a KV-cache input ``[batch, kv_heads, past, head_dim]``: its
    static dimensions, or those of the fused attention node reading it (GenAI's model builder
    leaves the head size symbolic)."""
    dims = [] if value.shape is None else list(value.shape)
    if len(dims) == 4 and isinstance(dims[1], int) and isinstance(dims[3], int):
        return dims[1], dims[3]
    attention = cache_reader(value)
    if len(dims) == 4 and attention is not None:
        return attention.kv_heads, attention.head_size
    raise QronosError(
        f"KV-cache input {name} must be [batch, kv_heads, past, head_dim] with static kv_heads "
        f"and head_dim, or be read by a GroupQueryAttention/MultiHeadAttention node whose head "
        f"size the graph tells; got {dims}"
    )


def _vocab_size(input_ids: ir.Value, logits: ir.Value) -> int | None:
    """The smaller of the embedding's rows (a Gather of ``input_ids`` from an initializer) and
    the logits' static last dimension; ``None`` when neither is known."""
    sizes = _gathered_rows(input_ids)
    if logits.shape is not None and len(logits.shape) and isinstance(logits.shape[-1], int):
        sizes.append(logits.shape[-1])
    return min(sizes) if sizes else None


#: Ops that pass indices on unchanged (up to shape and integer type).
_INDEX_PASSTHROUGH = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}


def _gathered_rows(indices: ir.Value) -> list[int]:
    """Row counts of the constant tables that ``indices`` (possibly through casts and
    reshapes) index with an axis-0 Gather: an embedding or a position table."""
    rows, todo, seen = [], [indices], set()
    while todo:
        value = todo.pop()
        for node in value.consumers():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in _INDEX_PASSTHROUGH and node.inputs[0] is value:
                todo.extend(node.outputs)
            elif (
                node.op_type == "Gather"
                and node.inputs[1] is value
                and is_constant(node.inputs[0])
                and node.attributes.get_int("axis", 0) == 0
            ):
                rows.append(static_shape(constant(node.inputs[0]))[0])
    return rows


def _past_key(name: str) -> tuple[int, str]:
    match = _PAST.match(name)
    assert match is not None  # called with the names of KV-cache inputs only
    layer, kind = match.groups()
    return int(layer), kind
