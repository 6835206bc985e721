"""Warmup-stable-decay (WSD) learning-rate schedule, as used for Nemotron 3 pretraining."""

from __future__ import annotations

import math


def wsd_lr(step: int, total: int, peak: float, warmup: int, decay_fraction: float,
           min_ratio: float, shape: str = "linear") -> float:
    """LR for optimizer step ``step`` (0-based) of ``total``: linear warmup to ``peak``, constant,
    then over the last ``decay_fraction`` of the steps down to ``min_ratio * peak``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = int(round(total * decay_fraction))
    decay_start = total - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    frac = progress if shape == "linear" else math.sqrt(progress)
    return peak * (1.0 - (1.0 - min_ratio) * frac)
