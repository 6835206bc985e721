"""RMSNorm and the grouped, gated RMSNorm that closes each Mamba-2 mixer.

Both normalize in float32 and cast back, as the NemotronH reference does, so bf16 models keep fp32
statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinetic.kernels import cpu as cpu_kernels


class _RMSNormFn(torch.autograd.Function):
    """``weight * x / rms(x)`` in float32 with a hand-written backward that saves what autograd's
    ``rms_norm`` saves (x and 1/rms) and takes half its time on CPU (measured 1.7 vs 3.4 ms for
    forward + backward of 4 x 512 x 256). Used for training on CPU; CUDA keeps the fused kernel."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        return (xf * rstd).mul_(weight.float()).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.float() * rstd
        grad = grad.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        gn = grad * weight.float()  # d loss / d xhat
        mean_dot = (gn * xhat).mean(-1, keepdim=True)
        grad_x = gn.sub_(xhat.mul_(mean_dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


class _RMSNormC(torch.autograd.Function):
    """The same in C on CPUs (float32; the gated norm's kernel without a gate, one group): one pass
    each way, the backward's weight gradient summed per thread."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        out, rstd = cpu_kernels.gated_norm_forward(x, None, weight, x.shape[-1], eps, keep=True)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dx, _, dweight = cpu_kernels.gated_norm_backward(x, None, weight, rstd, grad, x.shape[-1])
        return dx, dweight, None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)):  # CUDA keeps its fused kernel
            if cpu_kernels.gated_norm_fits(x, None, self.weight, x.shape[-1]):
                return _RMSNormC.apply(x, self.weight, self.eps)
            return _RMSNormFn.apply(x, self.weight, self.eps)
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)


def _gated_normalize(x, gate, group_size: int, eps: float):
    """float32 x, gate, silu(gate), rmsnorm_groups(x * silu(gate)) and its 1/rms per group."""
    *prefix, width = x.shape
    xf, gf = x.float(), gate.float()
    sg = F.silu(gf)
    h = (xf * sg).view(*prefix, width // group_size, group_size)
    sq = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_()
    rstd = sq.div_(group_size).add_(eps).rsqrt_()  # (..., groups, 1)
    normed = h.mul_(rstd).view(*prefix, width)  # h is a fresh product, normalized in place
    return xf, gf, sg, normed, rstd


class _GatedRMSNormFn(torch.autograd.Function):
    """``weight * rmsnorm_groups(x * silu(gate))`` with a hand-written backward: a few fused passes
    over the activations instead of the dozen or so autograd records through silu, mul, pow, mean,
    rsqrt and the weight product. Statistics in float32; the result in x's dtype."""

    @staticmethod
    def forward(ctx, x, gate, weight, group_size: int, eps: float):
        xf, gf, sg, normed, rstd = _gated_normalize(x, gate, group_size, eps)
        ctx.save_for_backward(xf, gf, sg, normed, rstd, weight)
        ctx.group_size, ctx.dtypes = group_size, (x.dtype, gate.dtype)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xf, gf, sg, normed, rstd, weight = ctx.saved_tensors
        gs = ctx.group_size
        *prefix, width = normed.shape
        grad = grad.float()
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad * normed).reshape(-1, width).sum(0).to(weight.dtype)
        gn = (grad * weight.float()).view(*prefix, width // gs, gs)  # d loss / d normalized
        nv = normed.view(*prefix, width // gs, gs)
        mean_dot = (gn * nv).sum(-1, keepdim=True).div_(gs)
        gh = gn.sub_(nv * mean_dot).mul_(rstd).view(*prefix, width)  # d loss / d (x * silu(gate))
        grad_x = (gh * sg).to(ctx.dtypes[0])
        grad_gate = torch.ops.aten.silu_backward(gh.mul_(xf), gf).to(ctx.dtypes[1])
        return grad_x, grad_gate, grad_weight, None, None


class _GatedRMSNormC(torch.autograd.Function):
    """The same in C on CPUs (float32; ``kinetic/kernels/mamba.c``): one pass over x and the gate
    forward, keeping only each group's 1/rms; the backward recomputes silu(gate) and the product."""

    @staticmethod
    def forward(ctx, x, gate, weight, group_size: int, eps: float, grad_into=None):
        out, rstd = cpu_kernels.gated_norm_forward(x, gate, weight, group_size, eps, keep=True)
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.group_size = group_size
        ctx.grad_into = grad_into
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, gate, weight, rstd = ctx.saved_tensors
        into = ctx.grad_into
        dgate = into[0].destination(into[1]) if into is not None and ctx.needs_input_grad[1] else None
        return (*cpu_kernels.gated_norm_backward(x, gate, weight, rstd, grad, ctx.group_size, dgate),
                None, None, None)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x * silu(gate))`` computed per group of ``group_size`` channels (Mamba-2's norm)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor, grad_into=None) -> torch.Tensor:
        """``grad_into``: a (SharedGrad, slice index) pair where the C kernel may write the gate's
        gradient (see kinetic.model.shared_grad); torch's operators ignore it."""
        if cpu_kernels.gated_norm_fits(x, gate, self.weight, self.group_size):
            if not torch.is_grad_enabled():
                return cpu_kernels.gated_norm_forward(x, gate, self.weight, self.group_size, self.eps,
                                                      keep=False)[0]
            return _GatedRMSNormC.apply(x, gate, self.weight, self.group_size, self.eps, grad_into)
        if not torch.is_grad_enabled():  # inference: the same math without autograd.Function's overhead
            normed = _gated_normalize(x, gate, self.group_size, self.eps)[3]
            return self.weight * normed.to(x.dtype)
        return _GatedRMSNormFn.apply(x, gate, self.weight, self.group_size, self.eps)

    def reference(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The same function composed of plain torch ops (autograd's backward); used in tests."""
        dtype = x.dtype
        h = x.float() * F.silu(gate.float())
        *prefix, width = h.shape
        h = h.view(*prefix, width // self.group_size, self.group_size)
        h = F.rms_norm(h, (self.group_size,), None, self.eps).view(*prefix, width)
        return self.weight * h.to(dtype)
