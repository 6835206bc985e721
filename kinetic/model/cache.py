"""InferenceCache: what decoding must remember — Mamba conv + SSM states (constant size) and KV
caches for the attention layers only. Keys are the mixers' ``cache_key`` (e.g. ``layers.5``)."""

from __future__ import annotations

import torch


class InferenceCache:
    def __init__(self, ssm_dtype: torch.dtype = torch.float32) -> None:
        self.ssm_dtype = ssm_dtype
        self.conv: dict[str, torch.Tensor] = {}
        self.ssm: dict[str, torch.Tensor] = {}
        self._k: dict[str, torch.Tensor] = {}  # (b, kv_heads, capacity, head_dim)
        self._v: dict[str, torch.Tensor] = {}
        self._len: dict[str, int] = {}

    # ---- Mamba
    def has_state(self, key: str) -> bool:
        return key in self.ssm

    def mamba_state(self, key: str, conv_shape: tuple, ssm_shape: tuple, like: torch.Tensor):
        """Current (conv_state, ssm_state) of a Mamba layer; zeros before its first token."""
        if key not in self.ssm:
            self.conv[key] = like.new_zeros(conv_shape)
            self.ssm[key] = torch.zeros(ssm_shape, dtype=self.ssm_dtype, device=like.device)
        return self.conv[key], self.ssm[key]

    def set_conv_state(self, key: str, state: torch.Tensor) -> None:
        self.conv[key] = state.detach().clone()

    def set_ssm_state(self, key: str, state: torch.Tensor) -> None:
        self.ssm[key] = state.detach().to(self.ssm_dtype)

    # ---- attention
    def kv_length(self, key: str) -> int:
        return self._len.get(key, 0)

    def append_kv(self, key: str, k: torch.Tensor, v: torch.Tensor):
        """Append (b, kv_heads, new, d) keys/values; return all keys/values so far (views).

        Storage grows by doubling so a long generation copies O(length) elements in total.
        """
        old = self._len.get(key, 0)
        new = old + k.shape[2]
        buf_k = self._k.get(key)
        if buf_k is None or buf_k.shape[2] < new:
            cap = max(new, 2 * (buf_k.shape[2] if buf_k is not None else 0), 16)
            grown_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            grown_v = v.new_empty(grown_k.shape)
            if buf_k is not None:
                grown_k[:, :, :old] = buf_k[:, :, :old]
                grown_v[:, :, :old] = self._v[key][:, :, :old]
            self._k[key], self._v[key] = grown_k, grown_v
        self._k[key][:, :, old:new] = k.detach()
        self._v[key][:, :, old:new] = v.detach()
        self._len[key] = new
        return self._k[key][:, :, :new], self._v[key][:, :, :new]

    @property
    def seqlen(self) -> int:
        """Tokens seen so far (by the attention layers; 0 for an attention-free model)."""
        return max(self._len.values(), default=0)

    def nbytes(self) -> int:
        tensors = [*self.conv.values(), *self.ssm.values()]
        tensors += [self._k[k][:, :, : self._len[k]] for k in self._k]
        tensors += [self._v[k][:, :, : self._len[k]] for k in self._v]
        return sum(t.numel() * t.element_size() for t in tensors)
