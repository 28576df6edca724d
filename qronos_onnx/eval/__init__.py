"""Evaluation: perplexity, and agreement with a reference (float) model."""

from .perplexity import EvalResult, evaluate_windows

__all__ = ["EvalResult", "evaluate_windows"]
