"""Mamba-2 mixer: the chunked SSD scan for whole sequences and an O(1)-memory recurrent ``step``.

Shapes legend: b batch, l sequence, c chunks, L chunk length, h heads, g B/C groups (each shared by
h / g heads), p head dim, n state size.

The SSM, per head: s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T (a p x n state), y_t = s_t C_t + D x_t.
The chunked scan (state-space duality) computes the same outputs as a quadratic, attention-like
form within chunks of L positions plus the recurrence across chunks, which is matmuls throughout.

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

from kinetic import ops
from kinetic.config import ModelConfig
from kinetic.model.norm import GatedRMSNorm


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for i >= j, ``-inf`` above the diagonal, so
    that exp(out) is the decay from position j to position i (a masked cumulative sum: a difference
    of cumulative sums loses precision when the decay is large)."""
    t = a.shape[-1]
    ones = torch.ones(t, t, dtype=torch.bool, device=a.device)
    x = a.unsqueeze(-1).expand(*a.shape, t).masked_fill(~torch.tril(ones, -1), 0.0)
    return x.cumsum(-2).masked_fill(~torch.tril(ones), -math.inf)


@ops.operation("ssd_chunk_scan")
def ssd_chunk_scan(
    x: torch.Tensor,  # (b, l, h, p)
    dt: torch.Tensor,  # (b, l, h), already softplus-ed and clamped
    A: torch.Tensor,  # (h,), negative
    B: torch.Tensor,  # (b, l, g, n)
    C: torch.Tensor,  # (b, l, g, n)
    chunk_size: int,
    initial_state: torch.Tensor | None = None,  # (b, h, p, n)
    D: torch.Tensor | None = None,  # (h,): adds the skip term D x to y
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD scan in float32 (after mamba_ssm's ``ssd_minimal``). Returns y (b, l, h, p)
    and the final state (b, h, p, n)."""
    b, length, h, p = x.shape
    r = h // B.shape[2]
    B, C = B.repeat_interleave(r, dim=2), C.repeat_interleave(r, dim=2)  # (b, l, h, n): per head
    chunk = max(1, min(chunk_size, length))  # a short input is one chunk of its own length
    pad = -length % chunk  # padded steps have dt = 0: no input and no decay
    xdt, a = x * dt.unsqueeze(-1), dt * A  # the input and the log-decay of each step
    xdt, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xdt, B, C))
    a = F.pad(a, (0, 0, 0, pad))
    X, B, C = (t.unflatten(1, (-1, chunk)) for t in (xdt, B, C))  # (b, c, L, h, .)
    a = a.unflatten(1, (-1, chunk)).permute(0, 3, 1, 2)  # (b, h, c, L)
    a_cs = a.cumsum(-1)

    # 1. within each chunk, a causal "attention" of C_l . B_s decayed from s to l
    decay = torch.exp(segsum(a))  # (b, h, c, L, L)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, X)

    # 2. the state each chunk adds by its end
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # (b, h, c, L)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, X)

    # 3. the state entering each chunk: the recurrence across chunks, as one matmul
    if initial_state is None:
        initial_state = states.new_zeros(b, h, p, states.shape[-1])
    states = torch.cat([initial_state.float().unsqueeze(1), states], dim=1)  # (b, c+1, h, p, n)
    across = torch.exp(segsum(F.pad(a_cs[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", across, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. what the entering state contributes to each position of its chunk
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cs))
    y = (y_diag + y_off).flatten(1, 2)[:, :length]
    if D is not None:
        y = y + x * D[:, None]
    return y, final


def ssd_recurrence(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same SSM step by step, keeping the state after every position: y (b, l, h, p) without the
    D skip, and states (b, l, h, p, n). For the few positions of a speculative verification, whose
    states ``cache.keep(n)`` may need."""
    b, length, h, p = x.shape
    r = h // B.shape[2]
    decay = torch.exp(dt * A).view(b, length, h, 1, 1)
    Bh = B.repeat_interleave(r, dim=2).unsqueeze(3)  # (b, l, h, 1, n)
    inputs = (x * dt.unsqueeze(-1)).unsqueeze(-1) * Bh  # (b, l, h, p, n): dt_t x_t B_t^T
    state = None if initial_state is None else initial_state.float()
    states = []
    for t in range(length):
        state = inputs[:, t] if state is None else torch.addcmul(inputs[:, t], state, decay[:, t])
        states.append(state)
    states = torch.stack(states, 1)
    Ch = C.repeat_interleave(r, dim=2).unsqueeze(-1)  # (b, l, h, n, 1)
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

    def _state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return ((batch, self.conv_dim, self.kernel - 1),
                (batch, self.num_heads, self.head_dim, self.state_size))

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        """hidden: (b, l, hidden). With ``cache`` the conv/SSM states are read and updated."""
        if cache is not None and hidden.shape[1] == 1 and cache.has_state(self.cache_key):
            return self.step(hidden, cache)
        b, length, _ = hidden.shape
        z, xbc, dt_raw = ops.split_channels(self.in_proj(hidden), [self.inner, self.conv_dim, self.num_heads])
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        conv_state = ssm_state = None
        if cache is not None:
            conv_state, ssm_state = cache.mamba_state(self.cache_key, *self._state_shapes(b), xbc)
            window = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)
        xs, B, C = self._split_xbc(ops.causal_conv1d_silu(xbc, weight, bias, conv_state))
        if cache is not None:  # after the conv read the old state (a static cache updates in place)
            cache.set_conv_state(self.cache_key, window[..., -(self.kernel - 1):])
        x = xs.reshape(b, length, self.num_heads, self.head_dim).float()
        B = B.reshape(b, length, self.n_groups, self.state_size).float()
        C = C.reshape(b, length, self.n_groups, self.state_size).float()
        dt, A = self._dt(dt_raw), -torch.exp(self.A_log.float())
        if cache is not None and cache.is_tracking:  # keep every position's state for cache.keep(n)
            y, states = ssd_recurrence(x, dt, A, B, C, ssm_state)
            cache.track_mamba(self.cache_key, window, states, self.kernel)
            final = states[:, -1]
            y = y + x * self.D.float()[:, None]
        else:
            y, final = ssd_chunk_scan(x, dt, A, B, C, self.chunk_size, ssm_state, self.D.float())
        if cache is not None:
            cache.set_ssm_state(self.cache_key, final)
        y = self.norm(y.reshape(b, length, self.inner), z)
        return self.out_proj(y.to(hidden.dtype))

    def step(self, hidden: torch.Tensor, cache) -> torch.Tensor:
        """One token per sequence, the recurrence itself: hidden (b, 1, hidden) -> (b, 1, hidden);
        updates the cache."""
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
