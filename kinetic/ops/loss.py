"""The language-model head: logits, and the cross-entropy of hidden states against targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinetic.ops.registry import operation

IGNORE_INDEX = -100  # targets with this value do not count


@operation("lm_head_logits")
def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T``: hidden (..., d), weight (vocab, d) -> logits (..., vocab)."""
    return F.linear(hidden, weight)


@operation("linear_cross_entropy")
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` (float32) against ``targets``: hidden
    (..., d), targets (...); targets equal to ``ignore_index`` do not count (0 when none counts)."""
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().T
    targets = targets.reshape(-1)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)
