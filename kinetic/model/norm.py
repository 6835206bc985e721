"""RMSNorm and the grouped, gated RMSNorm that closes each Mamba-2 mixer (the computation is
:func:`kinetic.ops.rms_norm` / :func:`kinetic.ops.gated_rms_norm`)."""

from __future__ import annotations

import torch
from torch import nn

from kinetic import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x * silu(gate))`` computed per group of ``group_size`` channels (Mamba-2's norm)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, gate, self.weight, self.group_size, self.eps)
