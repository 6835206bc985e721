"""Mamba-2 mixer: chunked SSD scan for whole sequences and an O(1)-memory recurrent ``step``.

Shapes legend: b batch, l sequence, c chunks, L chunk length, h heads, g B/C groups, r = h / g heads
per group, p head dim, n state size. B and C are shared by the r heads of a group; the scan keeps
that grouping (it never repeats B/C per head), which saves memory and FLOPs against a naive version.

Δt handling (a deliberate divergence from transformers): Δt = softplus(raw + dt_bias) is clamped to
``config.time_step_limit`` in every path (training, prefill and decode). transformers clamps at
``time_step_min`` in prefill but not in its single-token step, so its cached and uncached outputs
differ whenever Δt < time_step_min; ours agree by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kinetic.config import ModelConfig
from kinetic.kernels import cpu as cpu_kernels
from kinetic.model.conv import causal_conv1d_silu
from kinetic.model.norm import GatedRMSNorm
from kinetic.model.shared_grad import SharedGrad, split_shared


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(a[..., j+1:i+1])`` for i >= j, ``-inf`` above the diagonal.

    Built from a masked cumulative sum rather than a difference of cumsums, which loses precision
    when the cumulative decay is large.
    """
    t = a.shape[-1]
    ones = torch.ones(t, t, dtype=torch.bool, device=a.device)
    x = a.unsqueeze(-1).expand(*a.shape, t).masked_fill(~torch.tril(ones, -1), 0.0)
    return x.cumsum(-2).masked_fill(~torch.tril(ones), -math.inf)


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


def ssd_scan(
    x: torch.Tensor,  # (b, l, h, p)
    dt: torch.Tensor,  # (b, l, h), already softplus-ed and clamped
    A: torch.Tensor,  # (h,), negative
    B: torch.Tensor,  # (b, l, g, n)
    C: torch.Tensor,  # (b, l, g, n)
    chunk_size: int,
    initial_state: torch.Tensor | None = None,  # (b, h, p, n)
    D: torch.Tensor | None = None,  # (h,): adds the skip term D x to y
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD (state-space duality) scan in float32. Returns y (b, l, h, p), final state.

    Works in a head-major layout (b, g, r, c, L, ...) so the batched matmuls need no hidden copies.
    """
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
    kernel = cpu_kernels.ssd_chunk_fits(x_heads, C)
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


def ssd_states(
    x: torch.Tensor,  # (b, l, h, p)
    dt: torch.Tensor,  # (b, l, h)
    A: torch.Tensor,  # (h,)
    B: torch.Tensor,  # (b, l, g, n)
    C: torch.Tensor,  # (b, l, g, n)
    initial_state: torch.Tensor | None = None,  # (b, h, p, n)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSM state after every position, for short inputs (speculative verification): returns
    y (b, l, h, p) without the D skip, and states (b, l, h, p, n). The recurrence of ``step``, one
    fused multiply-add per position (for the few positions of a verification that is fewer and
    cheaper operations than the chunked scan's quadratic form); ``ssd_scan`` is the general path."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    decay = torch.exp(dt * A).view(b, seqlen, h, 1, 1)
    Bh = B.view(b, seqlen, g, 1, 1, n).expand(b, seqlen, g, r, 1, n).reshape(b, seqlen, h, 1, n)
    inputs = (x * dt.unsqueeze(-1)).unsqueeze(-1) * Bh  # (b, l, h, p, n): x_t dt_t B_t^T
    state = None if initial_state is None else initial_state.float()
    states = []
    for t in range(seqlen):  # s_t = s_{t-1} * exp(dt_t A) + x_t dt_t B_t^T
        state = inputs[:, t] if state is None else torch.addcmul(inputs[:, t], state, decay[:, t])
        states.append(state)
    states = torch.stack(states, 1)
    Ch = C.view(b, seqlen, g, 1, n).expand(b, seqlen, g, r, n).reshape(b, seqlen, h, n, 1)
    return torch.matmul(states, Ch).squeeze(-1), states


class Mamba2Mixer(nn.Module):
    """Selective state-space mixer of NemotronH (HF parameter names: in_proj, conv1d, dt_bias,
    A_log, D, norm, out_proj)."""

    def __init__(self, config: ModelConfig, cache_key: str = "") -> None:
        super().__init__()
        self.cache_key = cache_key
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.chunk_size = config.chunk_size
        self.kernel = config.conv_kernel
        self.inner = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim
        self.dt_limit = tuple(config.time_step_limit)
        self.in_proj = nn.Linear(config.hidden_size, self.inner + self.conv_dim + self.num_heads,
                                 bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                padding=self.kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.inner, self.inner // self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=config.use_bias)

    def _dt(self, raw: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(raw.float() + self.dt_bias.float())
        lo, hi = self.dt_limit
        return dt.clamp(min=lo, max=hi) if (lo > 0 or math.isfinite(hi)) else dt

    def _split_xbc(self, xbc: torch.Tensor):
        sizes = [self.inner, self.n_groups * self.state_size, self.n_groups * self.state_size]
        return torch.split(xbc, sizes, dim=-1)

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        """hidden: (b, l, hidden). With ``cache`` the conv/SSM states are read and updated."""
        if cache is not None and hidden.shape[1] == 1 and cache.has_state(self.cache_key):
            return self.step(hidden, cache)
        b, seqlen, _ = hidden.shape
        proj = self.in_proj(hidden)
        sizes = [self.inner, self.conv_dim, self.num_heads]
        shared = None
        training = proj.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cache is None and training:
            # training: the C conv and gated norm write their gradients into one buffer for in_proj
            (z, xbc, dt_raw), shared = split_shared(proj, sizes)
        else:
            z, xbc, dt_raw = torch.split(proj, sizes, dim=-1)
        weight, bias = self.conv1d.weight, self.conv1d.bias
        initial_state = None
        if cache is None:
            xbc = causal_conv1d_silu(xbc, weight, bias, grad_into=None if shared is None else (shared, 1))
        else:
            conv_state, initial_state = cache.mamba_state(self.cache_key, *self._state_shapes(b), xbc)
            window = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)
            cache.set_conv_state(self.cache_key, window[..., -(self.kernel - 1):])
            if seqlen <= 16:
                # a few tokens (speculative verification): each position's taps times the weights,
                # summed as the single-token step sums them, in three operations whatever the length
                # (the taps one by one took 2 x kernel; F.conv1d is slower at this size on CPU)
                out = (window.unfold(-1, self.kernel, 1) * weight[:, 0, None]).sum(-1)
                out = out + bias[:, None] if bias is not None else out
            else:
                out = F.conv1d(window, weight, bias, groups=self.conv_dim)
            xbc = F.silu(out).transpose(1, 2)
        xs, B, C = self._split_xbc(xbc)
        dt = self._dt(dt_raw)
        A = -torch.exp(self.A_log.float())
        args = (xs.reshape(b, seqlen, self.num_heads, self.head_dim).float(), dt, A,
                B.reshape(b, seqlen, self.n_groups, self.state_size).float(),
                C.reshape(b, seqlen, self.n_groups, self.state_size).float())
        if cache is not None and cache.is_tracking:  # keep every position's state for cache.keep(n)
            y, states = ssd_states(*args, initial_state)
            cache.track_mamba(self.cache_key, window, states, self.kernel)
            final = states[:, -1]
            y = y + args[0] * self.D.float()[:, None]
        else:
            y, final = ssd_scan(*args, self.chunk_size, initial_state, self.D.float())
        if cache is not None:
            cache.set_ssm_state(self.cache_key, final)
        y = self.norm(y.reshape(b, seqlen, self.inner), z, grad_into=None if shared is None else (shared, 0))
        return self.out_proj(y.to(hidden.dtype))

    def _state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return ((batch, self.conv_dim, self.kernel - 1),
                (batch, self.num_heads, self.head_dim, self.state_size))

    def step(self, hidden: torch.Tensor, cache) -> torch.Tensor:
        """One token per sequence: hidden (b, 1, hidden) -> (b, 1, hidden); updates the cache."""
        b = hidden.shape[0]
        z, xbc, dt_raw = torch.split(self.in_proj(hidden[:, 0]),
                                     [self.inner, self.conv_dim, self.num_heads], dim=-1)
        conv_state, ssm_state = cache.mamba_state(self.cache_key, *self._state_shapes(b), xbc)
        window = torch.cat([conv_state.to(xbc.dtype), xbc.unsqueeze(-1)], dim=-1)  # (b, conv, k)
        cache.set_conv_state(self.cache_key, window[..., 1:])
        xbc = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias
        xs, B, C = self._split_xbc(F.silu(xbc))
        x = xs.reshape(b, self.num_heads, self.head_dim).float()
        r = self.num_heads // self.n_groups
        B = B.reshape(b, self.n_groups, 1, self.state_size).float().expand(-1, -1, r, -1)
        C = C.reshape(b, self.n_groups, 1, self.state_size).float().expand(-1, -1, r, -1)
        B = B.reshape(b, self.num_heads, self.state_size)
        C = C.reshape(b, self.num_heads, self.state_size)
        dt = self._dt(dt_raw)  # (b, h)
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))
        state = ssm_state.float() * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None]
        cache.set_ssm_state(self.cache_key, state)
        if cache.is_tracking:
            cache.track_mamba(self.cache_key, window, state.unsqueeze(1), self.kernel)
        y = torch.einsum("bhpn,bhn->bhp", state, C) + x * self.D.float()[:, None]
        y = self.norm(y.reshape(b, 1, self.inner), z.unsqueeze(1))
        return self.out_proj(y.to(hidden.dtype))
