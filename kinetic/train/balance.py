"""MoE load balancing as Nemotron 3 trains it: the aux-loss-free expert-bias update (DeepSeek-V3)
plus an optional small sequence-level balancing loss, and per-layer load statistics for the log."""

from __future__ import annotations

import torch
from torch import nn

from kinetic.model.moe import MoE


class ExpertBalancer:
    def __init__(self, model: nn.Module, bias_rate: float, balance_loss: float) -> None:
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.bias_rate = bias_rate
        self.balance_coef = balance_loss
        for _, moe in self.layers:
            moe.compute_balance_loss = balance_loss > 0
        self._counts: list[torch.Tensor | None] = [None] * len(self.layers)

    def loss(self) -> torch.Tensor | None:
        """Sum over MoE layers of the balance statistic from the last forward, times its coefficient."""
        terms = [m.balance_loss for _, m in self.layers if m.balance_loss is not None]
        for _, m in self.layers:
            m.balance_loss = None
        if not terms or self.balance_coef <= 0:
            return None
        return self.balance_coef * torch.stack(terms).sum()

    def accumulate(self) -> None:
        """Add the tokens each expert received in the last forward (call after every micro-batch)."""
        for i, (_, moe) in enumerate(self.layers):
            c = moe.last_tokens_per_expert
            if c is not None:
                c = c.float()
                self._counts[i] = c if self._counts[i] is None else self._counts[i] + c

    def reset(self) -> None:
        """Forget the counts of a step that was skipped."""
        self._counts = [None] * len(self.layers)

    @torch.no_grad()
    def step(self, all_reduce=None) -> dict[str, float]:
        """After the optimizer step: nudge each layer's score-correction bias toward balance,
        bias += rate * sign(mean load - load), and return max/mean load per layer."""
        stats = {}
        for i, (name, moe) in enumerate(self.layers):
            counts = self._counts[i]
            self._counts[i] = None
            if counts is None:
                continue
            if all_reduce is not None:
                counts = all_reduce(counts)
            mean = counts.mean()
            if self.bias_rate > 0:
                bias = moe.gate.e_score_correction_bias
                bias.add_(self.bias_rate * torch.sign(mean - counts).to(bias.dtype))
            stats[name] = float(counts.max() / mean) if mean > 0 else 0.0
        return stats
