"""InferenceCache: what decoding one batch of equal-length sequences must remember -- Mamba conv +
SSM states (constant size) and KV caches for the attention layers only. Keys are the mixers'
``cache_key`` (e.g. ``layers.5``). ``model(ids, cache)`` feeds tokens and updates it.

The decoder (:mod:`kinetic.infer.decoder`) keeps sequences at different positions in a
:class:`~kinetic.infer.slots.SlotCache`; this simpler cache is for model-level use: a cached forward
in tests, the long-context benchmark's prefill, anything that feeds one batch in lockstep.

Memory: ``cache_budget(config, tokens)`` gives the bytes a cache needs for ``tokens`` tokens before
anything runs, and ``reserve(tokens)`` allocates the KV buffers at that size up front, so a long
prefill does not pay the doubling growth's copies and slack.
"""

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
        self._reserved = 0  # KV capacity to allocate on first use
        self.is_tracking = False  # (a speculative verification's tracking is the SlotCache's)

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
    def reserve(self, tokens: int) -> None:
        """Allocate KV buffers for ``tokens`` tokens at once when they are first needed (and grow
        existing ones to that size now)."""
        self._reserved = max(self._reserved, int(tokens))
        for key, buf in self._k.items():
            if buf.shape[2] < tokens:
                self._grow(key, tokens)

    def _grow(self, key: str, capacity: int) -> None:
        old_k, old_v, n = self._k[key], self._v[key], self._len.get(key, 0)
        k = old_k.new_zeros(*old_k.shape[:2], capacity, old_k.shape[3])
        v = old_v.new_zeros(k.shape)
        k[:, :, :n] = old_k[:, :, :n]
        v[:, :, :n] = old_v[:, :, :n]
        self._k[key], self._v[key] = k, v

    def append_kv(self, key: str, k: torch.Tensor, v: torch.Tensor):
        """Append (b, kv_heads, new, d) keys/values; return all keys/values so far (views) and the
        number there were before (the new ones' first position).

        Storage grows by doubling (or to the reserved size) so a long generation copies O(length)
        elements in total.
        """
        old = self._len.get(key, 0)
        new = old + k.shape[2]
        buf_k = self._k.get(key)
        if buf_k is None:
            cap = max(new, self._reserved, 16)
            self._k[key] = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
            self._v[key] = v.new_zeros(self._k[key].shape)
        elif buf_k.shape[2] < new:
            self._grow(key, max(new, 2 * buf_k.shape[2], self._reserved))
        self._k[key][:, :, old:new] = k.detach()
        self._v[key][:, :, old:new] = v.detach()
        self._len[key] = new
        return self._k[key][:, :, :new], self._v[key][:, :, :new], old

    def kv_lengths(self) -> dict[str, int]:
        """Tokens cached by each attention layer."""
        return dict(self._len)

    @property
    def seqlen(self) -> int:
        """Tokens seen so far (by the attention layers; 0 for an attention-free model)."""
        return max(self._len.values(), default=0)

    def nbytes(self) -> int:
        """Bytes of live state: Mamba states plus the filled part of the KV caches."""
        tensors = [*self.conv.values(), *self.ssm.values()]
        tensors += [self._k[k][:, :, : self._len[k]] for k in self._k]
        tensors += [self._v[k][:, :, : self._len[k]] for k in self._v]
        return sum(t.numel() * t.element_size() for t in tensors)

    def allocated_bytes(self) -> int:
        """Bytes held, KV capacity included."""
        tensors = [*self.conv.values(), *self.ssm.values(), *self._k.values(), *self._v.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def cache_budget(config, tokens: int, *, batch: int = 1, dtype: torch.dtype = torch.float32,
                 ssm_dtype: torch.dtype = torch.float32, mtp: bool = False) -> dict:
    """Bytes an InferenceCache holds after ``tokens`` tokens, computed from the config alone:
    ``kv`` grows linearly (attention layers only), ``mamba`` (conv + SSM states) is constant.
    ``mtp=True`` adds the MTP layers' own cache (speculative decoding)."""
    pattern = config.hybrid_override_pattern
    if mtp and config.num_nextn_predict_layers:
        pattern += config.mtp_hybrid_override_pattern * config.num_nextn_predict_layers
    esize = torch.empty((), dtype=dtype).element_size()
    ssm_size = torch.empty((), dtype=ssm_dtype).element_size()
    kv_per_token = 2 * config.num_key_value_heads * config.head_dim * esize
    conv = config.mamba_conv_dim * (config.conv_kernel - 1) * esize
    ssm = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * ssm_size
    out = {"tokens": tokens, "attention_layers": pattern.count("*"), "mamba_layers": pattern.count("M"),
           "kv": batch * pattern.count("*") * kv_per_token * tokens,
           "mamba": batch * pattern.count("M") * (conv + ssm)}
    out["total"] = out["kv"] + out["mamba"]
    return out


def format_budget(budget: dict, weights_bytes: int | None = None) -> str:
    """One line for people: the cache budget (and weights) in MiB."""
    mib = 2**20
    line = (f"cache budget for {budget['tokens']:,} tokens: {budget['total'] / mib:,.1f} MiB = KV "
            f"{budget['kv'] / mib:,.1f} MiB ({budget['attention_layers']} attention layers) + Mamba "
            f"state {budget['mamba'] / mib:,.2f} MiB ({budget['mamba_layers']} layers, constant)")
    if weights_bytes is not None:
        line += f"; weights {weights_bytes / mib:,.1f} MiB"
    return line
