import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Builds (once per session) and returns a function ``variant -> model path``.

    Variants: ``"nokv"`` (no cache inputs), ``"kv"`` (KV-cache inputs), ``"untied"``
    (a separate lm_head weight), and with a KV cache the relatives ``"gemma"``, ``"gemma2"``,
    ``"gemma3"``, ``"fp16"`` and ``"bf16"`` (``tiny_llama.build_relative``). All have 2
    layers, hidden 64, grouped-query attention (4 heads, 2 KV heads), a byte-level tokenizer.
    """
    from models import tiny_llama

    built = {}

    def get(variant: str):
        if variant not in built:
            out = tmp_path_factory.mktemp(f"tiny_{variant}")
            if variant in ("gemma", "gemma2", "gemma3", "fp16", "bf16"):
                built[variant] = tiny_llama.build_relative(out, variant)
            else:
                built[variant] = tiny_llama.build(
                    out, layers=2, kv_cache=variant == "kv", untied=variant == "untied"
                )
        return built[variant]

    return get


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face checkpoint."""
    from models import tiny_llama

    return tiny_llama.build_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def builder_model(checkpoint, tmp_path_factory):
    """The checkpoint through ONNX Runtime GenAI's model builder (float32): GroupQueryAttention,
    (Skip)SimplifiedLayerNormalization, a packed QKV projection, a transposed tied embedding."""
    pytest.importorskip("onnxruntime_genai")
    from qronos_onnx.cli import main

    out = tmp_path_factory.mktemp("builder") / "float"
    assert main(["export", str(checkpoint), "-o", str(out), "--exporter", "genai"]) == 0
    return out / "model.onnx"
