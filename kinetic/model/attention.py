"""Grouped-query attention without positional encoding (NemotronH's Mamba layers carry position).

Whole sequences go through :func:`kinetic.ops.causal_attention`; with a cache, the new keys and
values are appended to the layer's entry and the new queries attend over it through
:func:`kinetic.ops.cached_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from kinetic import ops
from kinetic.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, cache_key: str = "") -> None:
        super().__init__()
        self.cache_key = cache_key
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        b, length, _ = hidden.shape
        q = self.q_proj(hidden).view(b, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(b, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(b, length, self.num_kv_heads, self.head_dim)
        if cache is None:
            out = ops.causal_attention(q, k, v)
        else:  # (b, heads, positions, d) in the cache
            keys, values, start = cache.append_kv(self.cache_key, k.transpose(1, 2), v.transpose(1, 2))
            out = ops.cached_attention(q.transpose(1, 2), keys, values, start).transpose(1, 2)
        return self.o_proj(out.reshape(b, length, self.num_heads * self.head_dim))
