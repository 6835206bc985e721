"""Causal depthwise Conv1d + SiLU (Mamba-2's short convolution) in (batch, seq, channels) layout.

The K-tap causal convolution is K shifted multiply-adds over the channels-last activations, so
neither direction needs the transposes (and strided SiLU backward) that ``nn.Conv1d`` on (b, c, l)
forces, and the weight gradient is K per-channel dot products instead of the generic depthwise
``convolution_backward``, which is slow on CPU. Tested against ``F.conv1d`` in tests/test_model.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (b, l, c), weight (c, k), bias (c,) -> silu(causal_conv(x)) as (b, l, c)."""
        k, seqlen = weight.shape[1], x.shape[1]
        xp = F.pad(x, (0, 0, k - 1, 0))  # (b, l + k - 1, c), contiguous
        pre = xp[:, k - 1:] * weight[:, k - 1]
        for j in range(k - 1):
            pre.addcmul_(xp[:, j:j + seqlen], weight[:, j])
        if bias is not None:
            pre += bias
        ctx.save_for_backward(xp, weight, pre)
        ctx.has_bias = bias is not None
        return F.silu(pre)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xp, weight, pre = ctx.saved_tensors
        k, seqlen = weight.shape[1], pre.shape[1]
        gp = torch.ops.aten.silu_backward(grad.contiguous(), pre)  # d loss / d pre-activation
        gx = gp * weight[:, k - 1]
        for j in range(k - 1):  # x[t] feeds pre[t + (k - 1 - j)] through tap j
            shift = k - 1 - j
            gx[:, : seqlen - shift].addcmul_(gp[:, shift:], weight[:, j])
        flat_gp = gp.reshape(-1, gp.shape[-1])
        gw = torch.stack([(xp[:, j:j + seqlen].reshape(-1, gp.shape[-1]) * flat_gp).sum(0)
                          for j in range(k)], dim=1)
        gb = flat_gp.sum(0) if ctx.has_bias else None
        return gx, gw, gb


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv) of x (b, l, c) with an ``nn.Conv1d`` weight (c, 1, k)."""
    return _CausalConvSiLU.apply(x, weight.squeeze(1), bias)
