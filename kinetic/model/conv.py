"""Causal depthwise Conv1d + SiLU (Mamba-2's short convolution) in (batch, seq, channels) layout.

The K-tap causal convolution is K shifted multiply-adds over the channels-last activations, so
neither direction needs the transposes (and strided SiLU backward) that ``nn.Conv1d`` on (b, c, l)
forces, and the weight gradient is K per-channel dot products instead of the generic depthwise
``convolution_backward``, which is slow on CPU. Tested against ``F.conv1d`` in tests/test_model.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinetic.kernels import cpu as cpu_kernels
from kinetic.model.shared_grad import SharedGrad


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (b, l, c), weight (c, k), bias (c,) -> silu(causal_conv(x)) as (b, l, c).

        Tap k-1 meets x[t] at output t, tap k-1-s meets x[t - s]: the first tap (with the bias)
        writes the output, the others add into its shifted slices, so x is never padded or copied."""
        k, seqlen = weight.shape[1], x.shape[1]
        pre = torch.mul(x, weight[:, k - 1]) if bias is None else torch.addcmul(bias, x, weight[:, k - 1])
        for s in range(1, min(k, seqlen + 1)):
            pre[:, s:].addcmul_(x[:, : seqlen - s], weight[:, k - 1 - s])
        ctx.save_for_backward(x, weight, pre)
        ctx.has_bias = bias is not None
        return F.silu(pre)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, pre = ctx.saved_tensors
        k, seqlen = weight.shape[1], pre.shape[1]
        gp = torch.ops.aten.silu_backward(grad, pre)  # d loss / d pre-activation
        gx = gp * weight[:, k - 1]
        for s in range(1, min(k, seqlen + 1)):  # x[t] feeds pre[t + s] through tap k-1-s
            gx[:, : seqlen - s].addcmul_(gp[:, s:], weight[:, k - 1 - s])
        # weight gradient, one per-channel dot product per tap. On CPU per sequence, so that each
        # product stays in cache; on accelerators one batched product per tap (fewer launches).
        gw = weight.new_zeros(weight.shape)
        pairs = zip(x.unbind(0), gp.unbind(0), strict=True) if x.device.type == "cpu" else [(x, gp)]
        for xb, gpb in pairs:
            for s in range(min(k, seqlen + 1)):
                prod = xb[..., : seqlen - s, :] * gpb[..., s:, :]
                gw[:, k - 1 - s] += prod.reshape(-1, prod.shape[-1]).sum(0)
        gb = gp.sum((0, 1)) if ctx.has_bias else None
        return gx, gw, gb


class _CausalConvSiLUC(torch.autograd.Function):
    """The same in C on CPUs (``kinetic/kernels/mamba.c``): one pass each way, the pre-activation
    recomputed in the backward pass instead of stored. With ``grad_into`` (a SharedGrad and a slice
    index, see kinetic.model.shared_grad) x's gradient is written into that slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                grad_into: tuple[SharedGrad, int] | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.grad_into = grad_into
        return cpu_kernels.conv_silu_forward(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        into = ctx.grad_into
        gx = into[0].destination(into[1]) if into is not None and ctx.needs_input_grad[0] else None
        return (*cpu_kernels.conv_silu_backward(*ctx.saved_tensors, grad, gx), None)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       grad_into: tuple[SharedGrad, int] | None = None) -> torch.Tensor:
    """silu(causal depthwise conv) of x (b, l, c) with an ``nn.Conv1d`` weight (c, 1, k): the C
    kernel where it runs (float32 CPU tensors), else torch's operators. ``grad_into``: where the C
    kernel may write x's gradient (see kinetic.model.shared_grad); torch's operators ignore it."""
    weight = weight.squeeze(1)
    if cpu_kernels.conv_silu_fits(x, weight):
        return _CausalConvSiLUC.apply(x, weight, bias, grad_into)
    return _CausalConvSiLU.apply(x, weight, bias)
