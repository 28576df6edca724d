import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Builds (once per session) and returns a function ``variant -> model path``.

    Variants: ``"nokv"`` (no cache inputs), ``"kv"`` (KV-cache inputs), ``"untied"``
    (a separate lm_head weight). All have 2 layers, hidden 64, a byte-level tokenizer.
    """
    from models import tiny_llama

    built = {}

    def get(variant: str):
        if variant not in built:
            out = tmp_path_factory.mktemp(f"tiny_{variant}")
            built[variant] = tiny_llama.build(
                out, layers=2, kv_cache=variant == "kv", untied=variant == "untied"
            )
        return built[variant]

    return get
