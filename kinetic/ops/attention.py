"""Grouped-query attention as operations: over a whole sequence, and for new queries over a cache.

NemotronH's attention has no positional encoding (its Mamba layers carry position); query head h
reads key/value head ``h // (heads // kv_heads)``; scores are scaled by ``1 / sqrt(head_dim)``.
"""

from __future__ import annotations

import torch

from kinetic.ops.registry import operation


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), over the ``visible`` keys) v, written out: q (b, heads, s, d), k and v
    (b, kv_heads, n, d), visible (s, n) or (b, 1, s, n) boolean -> (b, heads, s, d)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v.float()).to(q.dtype)


@operation("causal_attention")
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention in the projections' layout: q (b, l, heads, d), k and v (b, l, kv_heads,
    d) -> (b, l, heads, d); position i sees positions 0 .. i."""
    length = q.shape[1]
    visible = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), visible)
    return out.transpose(1, 2)


@operation("cached_attention")
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     start: int | torch.Tensor) -> torch.Tensor:
    """New queries over a KV cache: q (b, heads, s, d) at positions ``start`` .. ``start + s - 1``;
    k and v (b, kv_heads, n, d), the cache with the new keys already written at those positions.
    Query i sees keys 0 .. start + i; keys past the last query's position (a fixed-capacity buffer's
    unwritten tail) are ignored. ``start`` is an int, a 0-d device tensor where the position must
    not be read back to the host (CUDA graphs), or a (b,) tensor with each row's own position (a
    batch of sequences of different lengths). Returns (b, heads, s, d)."""
    s, n = q.shape[2], k.shape[2]
    start = torch.as_tensor(start, device=q.device).reshape(-1, 1)  # (b or 1, 1)
    position = start + torch.arange(s, device=q.device)  # (b or 1, s)
    visible = torch.arange(n, device=q.device) <= position[..., None]
    return attend(q, k, v, visible.unsqueeze(1))
