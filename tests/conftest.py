import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "models"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Builds (once per session) and returns a function ``variant -> model path``.

    Variants: ``"nokv"`` (no cache inputs), ``"kv"`` (KV-cache inputs), ``"untied"``
    (a separate lm_head weight). All have 2 layers, hidden 64, a byte-level tokenizer.
    """
    import tiny_llama

    built = {}

    def get(variant: str) -> Path:
        if variant not in built:
            out = tmp_path_factory.mktemp(f"tiny_{variant}")
            built[variant] = tiny_llama.build(out, layers=2, kv_cache=variant == "kv",
                                              untied=variant == "untied")
        return built[variant]

    return get


def padded_samples(signature, count=3, batch=2, seqlen=48, real=20, seed=1):
    """Calibration feeds of random windows, ``batch`` rows each, the last row right-padded
    (attention mask 0) after ``real`` tokens."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seqlen), np.int64)
    mask[-1, real:] = 0
    return [signature.feed(rng.integers(0, 256, (batch, seqlen)), mask) for _ in range(count)]


def random_samples(signature, count=3, seqlen=48, seed=0):
    """Calibration feeds of random token windows (batch 1)."""
    rng = np.random.default_rng(seed)
    return [signature.feed(rng.integers(0, 256, (1, seqlen))) for _ in range(count)]
