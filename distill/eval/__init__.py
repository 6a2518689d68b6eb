"""Held-out metrics and the evaluation entry used by runs and `distill eval`."""

from distill.eval.evaluate import evaluate_model
from distill.eval.metrics import exact_match, heldout_metrics

__all__ = ["evaluate_model", "exact_match", "heldout_metrics"]
