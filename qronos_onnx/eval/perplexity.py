"""Perplexity, KL divergence and top-1 agreement through ONNX Runtime, window by window.

Protocol (the README's evaluation protocol): non-overlapping windows, no BOS; each window
contributes the negative log-likelihood of its tokens 2..L (every token predicted from the ones
before it in the same window); perplexity is ``exp`` of the mean over all those tokens.
Logits are computed one window at a time (full-vocabulary logits of a whole evaluation set
would not fit in memory).
With a reference model: the mean over the same positions of ``KL(p_ref || p_model)`` and the
fraction of positions where both models' most likely next token agree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from qronos_onnx.calibration.session import make_session, run_session
from qronos_onnx.errors import QronosError
from qronos_onnx.ir.model_io import load_model
from qronos_onnx.ir.signature import LLMSignature, detect_signature


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


def evaluate_windows(
    model_path: str | os.PathLike,
    windows: np.ndarray,
    reference: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
    signatures: Sequence[LLMSignature] | None = None,
) -> EvalResult:
    """Score ``windows`` (``[n, seqlen]`` token ids) with the model at ``model_path``.

    ``signatures``: the model's (and the reference's), when the caller has them already. Each
    model is fed through its own signature, so a model with a KV cache can be compared with
    one without.

    Raises:
        QronosError: the two models' logits cover different vocabularies.
    """
    t0 = time.perf_counter()
    paths = [model_path] if reference is None else [model_path, reference]
    signatures = list(signatures or [detect_signature(load_model(path)) for path in paths])
    if len(signatures) != len(paths):
        raise ValueError(f"{len(signatures)} signatures for {len(paths)} models")
    labels = ["the model", "the reference model"]
    sessions = [
        make_session(str(path), device, what=f"{label} ({path})")
        for path, label in zip(paths, labels, strict=False)
    ]
    nll = kl = agree = 0.0
    count = 0
    for index, ids in enumerate(
        tqdm(windows, desc="evaluating", unit="window", disable=not progress)
    ):
        logps = []
        for session, sig, label, path in zip(sessions, signatures, labels, paths, strict=False):
            logits = run_session(session, [sig.logits], sig.feed(ids[None]), label)[0]
            if not np.isfinite(logits).all():
                raise QronosError(
                    f"{label} ({path}) computes NaN or Inf logits on window "
                    f"{index}: its weights or graph are broken, and perplexity is "
                    "undefined"
                )
            logps.append(log_softmax(logits[0, :-1]))  # position t predicts token t + 1
        logp = logps[0]
        targets = ids[1:]
        nll -= logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
        if reference is not None:
            ref = logps[1]
            if ref.shape != logp.shape:
                raise QronosError(
                    f"the model scores {logp.shape[-1]} tokens and the reference "
                    f"model {ref.shape[-1]}: they do not share a vocabulary"
                )
            kl += (np.exp(ref) * (ref - logp)).sum()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum()
    mean = nll / count
    result = EvalResult(
        float(np.exp(mean)), float(mean), count, len(windows), seconds=time.perf_counter() - t0
    )
    if reference is not None:
        result.kl, result.top1_agreement = float(kl / count), float(agree / count)
    return result
