"""Mamba-2's chunked SSD scan, in the layout fast implementations use (see ``ssd_chunk_scan`` in
kinetic.model.mamba2 for the reference it must match).

The torch version keeps each group's B and C shared by its heads, and the L x L decayed-score tile,
the scan's largest tensor, goes through a hand-written backward. The CPU version runs steps 1 and 3
in C (``mamba.c``), never writing that tile or the decayed C rows through memory, multiplies by dt
and adds D x as it goes, and writes the gradient of the chunk-entering states straight into the
buffer of their split (:mod:`kinetic.kernels.shared_grad`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kinetic.kernels import cpu as cpu_kernels
from kinetic.kernels.shared_grad import SharedGrad, split_shared


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(a[..., j+1:i+1])`` for i >= j, ``-inf`` above the diagonal."""
    t = a.shape[-1]
    ones = torch.ones(t, t, dtype=torch.bool, device=a.device)
    x = a.unsqueeze(-1).expand(*a.shape, t).masked_fill(~torch.tril(ones, -1), 0.0)
    return x.cumsum(-2).masked_fill(~torch.tril(ones), -math.inf)


def kernel_fits(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, initial_state: torch.Tensor | None = None,
                D: torch.Tensor | None = None) -> bool:
    """Whether the C version takes this scan (float32 CPU tensors, sizes the kernels handle)."""
    return cpu_kernels.ssd_chunk_fits(x, C, max(1, min(chunk_size, x.shape[1])))


# Log-decays below this are evaluated at it: exp(-60) ~ 8.8e-27, far below float32 resolution next to
# the decay-free diagonal term, and it keeps exp out of the underflow range (results near or below
# the smallest normal float), where x86 CPUs take a slow path for exp and for every product with a
# subnormal -- several times slower for the whole scan on long-decaying heads.
MIN_LOG_DECAY = -60.0


class _DecayedScores(torch.autograd.Function):
    """``cb[:, :, None] * exp(a_cs[..., l] - a_cs[..., s])`` for s <= l, 0 above the diagonal.

    This is the per-head L x L matrix of the SSD's within-chunk term, the largest tensor of the
    scan. The difference of cumulative sums is what the mamba_ssm kernels use within a chunk. A
    hand-written backward touches that tensor three times instead of the eight passes autograd
    makes through sub/masked_fill/exp/mul. Exponents are clamped to [MIN_LOG_DECAY, 0] (see there),
    which also keeps exp away from -inf and overflow above the diagonal, zeroed afterwards.
    """

    @staticmethod
    def forward(ctx, cb: torch.Tensor, a_cs: torch.Tensor) -> torch.Tensor:
        # cb: (b, g, c, L, L); a_cs: (b, g, r, c, L) -> (b, g, r, c, L, L)
        L = a_cs.shape[-1]
        above = torch.ones(L, L, dtype=torch.bool, device=a_cs.device).triu(1)
        decay = (a_cs.unsqueeze(-1) - a_cs.unsqueeze(-2)).clamp_(MIN_LOG_DECAY, 0.0)
        decay = decay.exp_().masked_fill_(above, 0.0)
        if not any(ctx.needs_input_grad):  # inference: reuse the buffer, keep nothing for backward
            return decay.mul_(cb.unsqueeze(2))
        ctx.save_for_backward(cb, decay)
        return decay * cb.unsqueeze(2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cb, decay = ctx.saved_tensors
        u = grad * decay
        grad_cb = u.sum(2)
        t = u.mul_(cb.unsqueeze(2))  # d out / d (a_cs[l] - a_cs[s]) = out
        grad_a = t.sum(-1) - t.sum(-2)
        return grad_cb, grad_a


class _ChunkScanC(torch.autograd.Function):
    """Step 3 of :func:`ssd_scan` -- each chunk's outputs from its own inputs and from the state
    entering it, plus the D skip -- in one C kernel per direction (CPU, float32;
    ``kinetic/kernels/mamba.c``). Each head's L x L tile is built in a small buffer, used and dropped,
    and rebuilt in the backward pass, so neither direction writes or reads the (b, g, r, c, L, L)
    scores or the decayed C rows (b, g, r, c, L, n) through memory; x and y keep the mixer's layout,
    and dt and D are applied in the kernel (no x dt or D x tensors, nor their gradients)."""

    @staticmethod
    def forward(ctx, cb, a_cs, x, dt, C, s_in, D, grad_into=None):
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(cb, a_cs, x, dt, C, s_in, D)
            ctx.grad_into = grad_into  # (SharedGrad, index): where s_in's gradient goes
        return cpu_kernels.ssd_chunk_forward(cb, a_cs, x, dt, C, s_in, D, MIN_LOG_DECAY)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        into = ctx.grad_into
        d_s = into[0].destination(into[1]) if into is not None and ctx.needs_input_grad[5] else None
        return (*cpu_kernels.ssd_chunk_backward(*ctx.saved_tensors, grad, MIN_LOG_DECAY, d_s), None)


class _ChunkStatesC(torch.autograd.Function):
    """Step 1 of :func:`ssd_scan` -- the state each chunk adds by its end -- in C (CPU, float32):
    x is read in the mixer's layout, dt applied in the kernel, and the states are written as the
    chunk-to-chunk pass reads them, so neither the decayed inputs nor their transposed copy are made."""

    @staticmethod
    def forward(ctx, a_cs, x, dt, B):
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(a_cs, x, dt, B)
        return cpu_kernels.ssd_states_forward(a_cs, x, dt, B, MIN_LOG_DECAY)

    @staticmethod
    def backward(ctx, grad):
        return cpu_kernels.ssd_states_backward(*ctx.saved_tensors, grad, MIN_LOG_DECAY)


def _carry(states: torch.Tensor, chunk_log_decay: torch.Tensor, initial_state: torch.Tensor | None,
           shared: bool = False) -> tuple[torch.Tensor, torch.Tensor, SharedGrad | None]:
    """Pass states across chunks with one (c+1) x c decay-matrix product (no Python loop).

    states (b, g, c, r, p, n): what each chunk adds by its end; chunk_log_decay (b, g, r, c): its
    total log-decay. Returns the state entering every chunk (b, g, r, c, p, n), the final state
    (b, g, r, p, n) and, with ``shared``, the SharedGrad the entering states' consumer may write
    their gradient into (kinetic.model.shared_grad), else None."""
    b, g, c, r, p, n = states.shape
    log_carry = segsum(F.pad(chunk_log_decay, (1, 0))).clamp(min=MIN_LOG_DECAY)
    carry = torch.exp(log_carry).tril()  # (b, g, r, c+1, c+1), zero above the diagonal
    flat = states.permute(0, 1, 3, 2, 4, 5).reshape(b, g, r, c, p * n)
    incoming = carry[..., 1:] @ flat  # (b, g, r, c+1, p*n): state entering chunk z, then final
    if initial_state is not None:
        incoming = incoming + carry[..., :1] * initial_state.float().reshape(b, g, r, 1, p * n)
    incoming = incoming.view(b, g, r, c + 1, p, n)
    if shared:
        (entering, final), grad = split_shared(incoming, [c, 1], dim=3)
        return entering, final.squeeze(3), grad
    return incoming[:, :, :, :-1], incoming[:, :, :, -1], None


def grouped_scan(
    x: torch.Tensor,  # (b, l, h, p)
    dt: torch.Tensor,  # (b, l, h), already softplus-ed and clamped
    A: torch.Tensor,  # (h,), negative
    B: torch.Tensor,  # (b, l, g, n)
    C: torch.Tensor,  # (b, l, g, n)
    chunk_size: int,
    initial_state: torch.Tensor | None = None,  # (b, h, p, n)
    D: torch.Tensor | None = None,  # (h,): adds the skip term D x to y
    kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_chunk_scan`` (kinetic.model.mamba2) in a head-major layout (b, g, r, c, L, ...) that
    keeps each B/C group shared by its heads, so the batched matmuls need no hidden copies. With
    ``kernel`` (check :func:`kernel_fits`), steps 1 and 3 run in C."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    # a sequence shorter than a chunk is one chunk of its own length: the result does not depend on
    # the chunk size, and padding a short prompt to a whole chunk costs up to twice the time
    chunk_size = max(1, min(chunk_size, seqlen))
    pad = (-seqlen) % chunk_size
    if pad:  # padded steps have dt = 0: no input and no decay, so the final state is unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c, L = (seqlen + pad) // chunk_size, chunk_size
    # x in the mixer's layout (b, c, L, g, r, p), seen head-major as (b, g, r, c, L, p)
    x_heads = x.view(b, c, L, g, r, p).permute(0, 3, 4, 1, 2, 5)
    dt_heads = dt.view(b, c, L, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, L)
    B = B.view(b, c, L, g, n).permute(0, 3, 1, 2, 4).contiguous()  # (b, g, c, L, n)
    C = C.view(b, c, L, g, n).permute(0, 3, 1, 2, 4).contiguous()
    a_cs = (dt_heads * A.view(1, g, r, 1, 1)).cumsum(-1)  # (b, g, r, c, L): cumulative log-decay
    cb = C @ B.transpose(-1, -2)  # (b, g, c, L, L): C_l . B_s within each chunk, shared by a group's heads
    if kernel:  # the kernels multiply by dt (and add D x) as they go
        dt_heads = dt_heads.contiguous()
    else:  # x dt, head-major in memory for torch's batched matmuls below
        xdt = (x * dt.unsqueeze(-1)).view(b, c, L, g, r, p).permute(0, 3, 4, 1, 2, 5).contiguous()

    # 1. the state each chunk adds by its end: sum_l decay(l -> end) * x_l dt_l B_l^T
    if kernel:  # (b, g, r, c, p, n) in memory, seen as (b, g, c, r, p, n)
        states = _ChunkStatesC.apply(a_cs, x_heads, dt_heads, B).permute(0, 1, 3, 2, 4, 5)
    else:
        to_end = torch.exp((a_cs[..., -1:] - a_cs).clamp_(min=MIN_LOG_DECAY)).unsqueeze(-1)  # (.., L, 1)
        xd = (xdt * to_end).permute(0, 1, 3, 2, 5, 4).reshape(b, g, c, r * p, L)
        states = (xd @ B).view(b, g, c, r, p, n)

    # 2. the state entering each chunk, and the final state
    # (b, g, r, c, p, n), (b, g, r, p, n); in training the chunk kernel writes s_in's gradient in place
    shared = kernel and torch.is_grad_enabled() and states.requires_grad
    s_in, final, s_in_grad = _carry(states, a_cs[..., -1], initial_state, shared)
    final = final.reshape(b, h, p, n)

    # 3. each chunk's outputs: a decayed, causal "attention" C_l . B_s over its own positions, plus
    #    what its incoming state contributes, exp(a_cs_l) C_l . s_in (and the skip D x)
    if kernel:  # (b, g, r, c, L, p) over a (b, c, L, g, r, p) tensor
        y = _ChunkScanC.apply(cb, a_cs, x_heads, dt_heads, C, s_in, D,
                              None if s_in_grad is None else (s_in_grad, 0))
        return y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * L, h, p)[:, :seqlen], final
    y = _DecayedScores.apply(cb, a_cs) @ xdt  # (b, g, r, c, L, p)
    c_in = C.unsqueeze(2) * torch.exp(a_cs.clamp(min=MIN_LOG_DECAY)).unsqueeze(-1)  # (b, g, r, c, L, n)
    y = torch.baddbmm(y.view(-1, L, p), c_in.view(-1, L, n), s_in.reshape(-1, p, n).transpose(1, 2))
    y = y.view(b, g, r, c, L, p).permute(0, 3, 4, 1, 2, 5).reshape(b, c * L, h, p)
    if D is not None:
        y = y + x * D[:, None]
    return y[:, :seqlen], final


