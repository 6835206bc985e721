"""RMSNorm and the grouped, gated RMSNorm that closes each Mamba-2 mixer.

Both normalize in float32 and cast back, as the NemotronH reference does, so bf16 models keep fp32
statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x * silu(gate))`` computed per group of ``group_size`` channels (Mamba-2's norm)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(gate.float())
        *prefix, width = h.shape
        h = h.view(*prefix, width // self.group_size, self.group_size)
        h = F.rms_norm(h, (self.group_size,), None, self.eps).view(*prefix, width)
        return self.weight * h.to(dtype)
