"""Grouped-query attention without positional encoding (NemotronH's Mamba layers carry position).

Computed by ``scaled_dot_product_attention``; with an ``InferenceCache`` the keys/values of earlier
tokens are read from and appended to that layer's KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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
        b, q_len, _ = hidden.shape
        q = self.q_proj(hidden).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past = 0
        if getattr(cache, "static", False):  # fixed-address decode step (see static_cache.py)
            k, v, mask = cache.append_kv_static(self.cache_key, k, v)
            out = _sdpa(q, k, v, mask, False)
            return self.o_proj(out.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim))
        if cache is not None:
            past = cache.kv_length(self.cache_key)
            k, v = cache.append_kv(self.cache_key, k, v)
        mask, causal = None, q_len > 1 and past == 0
        if q_len > 1 and past > 0:  # new queries see all cached keys plus a causal block
            mask = _lower_right_causal(q_len, past + q_len, q)
        out = _sdpa(q, k, v, mask, causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim))


def _lower_right_causal(q_len: int, kv_len: int, q: torch.Tensor):
    """Mask for queries at the last ``q_len`` of ``kv_len`` positions. On CUDA in half precision a
    ``CausalBias`` lets SDPA run a flash kernel without building the (q_len, kv_len) mask, so a chunk
    of a long prefill needs memory for the chunk only; elsewhere the boolean mask is built."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(q_len, kv_len)
    kv_pos = torch.arange(kv_len, device=q.device)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    return kv_pos[None, :] <= q_pos[:, None]


# cuDNN's attention builds an execution plan per shape; a decode step or prefill chunk has a new KV
# length every call, and the rebuild cost ~30 ms per call on an H100 (torch 2.11, bf16), ten times the
# whole decode step. The other CUDA backends have no per-shape setup.
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q, k, v, mask, causal):
    if q.is_cuda:
        with sdpa_kernel(_CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
