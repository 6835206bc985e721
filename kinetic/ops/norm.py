"""RMSNorm and Mamba-2's grouped, gated RMSNorm, as operations.

Both normalize in float32 and return x's dtype, as the NemotronH reference does, so bf16 models keep
fp32 statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinetic.ops.registry import operation


@operation("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


@operation("gated_rms_norm")
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x * silu(gate))``, the RMS taken over each group of ``group_size``
    channels (Mamba-2's closing norm; one group per B/C group)."""
    h = x.float() * F.silu(gate.float())
    *prefix, width = h.shape
    h = F.rms_norm(h.view(*prefix, width // group_size, group_size), (group_size,), None, eps)
    return weight * h.view(*prefix, width).to(x.dtype)
