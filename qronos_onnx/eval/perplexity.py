"""Perplexity, KL divergence and top-1 agreement through ONNX Runtime, window by window.

Protocol (EVALUATION.md): non-overlapping windows, no BOS; each window contributes the
negative log-likelihood of its tokens 2..L (every token predicted from the ones before it in the
same window); perplexity is ``exp`` of the mean over all those tokens. Logits are computed one
window at a time (full-vocabulary logits of a whole evaluation set would not fit in memory).
With a reference model: the mean over the same positions of ``KL(p_ref || p_model)`` and the
fraction of positions where both models' most likely next token agree.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..calibration.session import make_session, run_session
from ..ir.model_io import load_model
from ..ir.signature import LLMSignature, detect_signature


@dataclass
class EvalResult:
    """Evaluation of one model.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood (nats per token).
        tokens: positions scored (windows x (seqlen - 1)).
        windows: windows evaluated.
        kl: mean ``KL(reference || model)`` in nats, with a reference.
        top1_agreement: fraction of positions with the same argmax as the reference.
        seconds: wall time.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    kl: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def evaluate_windows(model_path: str | Path, windows: np.ndarray,
                     reference: str | Path | None = None, device: str = "auto",
                     progress: bool = True, signature: LLMSignature | None = None) -> EvalResult:
    """Score ``windows`` (``[n, seqlen]`` token ids) with the model at ``model_path``
    (``signature``: the model's, when the caller has it already)."""
    t0 = time.perf_counter()
    signature = signature or detect_signature(load_model(model_path))
    sessions = [make_session(str(model_path), device)]
    if reference is not None:
        sessions.append(make_session(str(reference), device))
    nll = kl = agree = 0.0
    count = 0
    for ids in tqdm(windows, desc="evaluating", unit="window", disable=not progress):
        feed = signature.feed(ids[None])
        logp = log_softmax(run_session(sessions[0], [signature.logits], feed, "the model")[0][0, :-1])
        targets = ids[1:]
        nll -= logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
        if reference is not None:
            ref = log_softmax(run_session(sessions[1], [signature.logits], feed,
                                          "the reference model")[0][0, :-1])
            kl += (np.exp(ref) * (ref - logp)).sum()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum()
    mean = nll / count
    result = EvalResult(float(np.exp(mean)), float(mean), count, len(windows),
                        seconds=time.perf_counter() - t0)
    if reference is not None:
        result.kl, result.top1_agreement = float(kl / count), float(agree / count)
    return result
