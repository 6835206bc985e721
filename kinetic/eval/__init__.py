"""Evaluation: held-out loss and bits per byte per domain, with baselines."""

from kinetic.eval.perplexity import evaluate_corpus, resolve_checkpoint

__all__ = ["evaluate_corpus", "resolve_checkpoint"]
