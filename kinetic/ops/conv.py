"""Mamba-2's short causal depthwise convolution followed by SiLU, as an operation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinetic.ops.registry import operation


@operation("causal_conv1d_silu")
def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       state: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(causal depthwise conv(x))``: x (b, l, c) channels last, weight (c, k), bias (c,) or
    None. Output t sees inputs t-k+1 .. t; before the first input come the k-1 inputs in ``state``
    (b, c, k-1) -- a decoding cache's -- or zeros. Returns (b, l, c)."""
    b, _, c = x.shape
    k = weight.shape[-1]
    prev = x.new_zeros(b, c, k - 1) if state is None else state.to(x.dtype)
    window = torch.cat([prev, x.transpose(1, 2)], dim=-1)  # (b, c, k - 1 + l)
    return F.silu(F.conv1d(window, weight.unsqueeze(1), bias, groups=c)).transpose(1, 2)


@operation("split_channels")
def split_channels(x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """``torch.split(x, sizes, dim=-1)``: an operation so that an implementation can hand the slices'
    consumers one shared gradient buffer (Mamba-2's in_proj output feeds the gate, the conv and Δt)."""
    return torch.split(x, sizes, dim=-1)
