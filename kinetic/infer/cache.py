"""InferenceCache: what decoding must remember — Mamba conv + SSM states (constant size) and KV
caches for the attention layers only. Keys are the mixers' ``cache_key`` (e.g. ``layers.5``).

Speculative decoding needs to undo part of a forward pass. Two mechanisms, both exact:

* ``with cache.tracking(): model(ids, cache)`` makes every layer remember, for each of the new
  positions, the state it would have after that position (Mamba layers keep their conv window and
  per-position SSM states; attention layers their previous KV length). ``cache.keep(n)`` then
  turns the cache into the state after the first ``n`` of those positions, as if only they had been
  fed — no recomputation.
* ``snap = cache.snapshot()`` / ``cache.restore(snap)``: O(1) bookmarks. States are replaced, never
  written in place, and KV entries below a remembered length are never overwritten, so a bookmark
  holds references, not copies.

Memory: ``cache_budget(config, tokens)`` gives the bytes a cache needs for ``tokens`` tokens before
anything runs, and ``reserve(tokens)`` allocates the KV buffers at that size up front, so a long
prefill does not pay the doubling growth's copies and slack.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class _Snapshot:
    conv: dict
    ssm: dict
    lengths: dict


class InferenceCache:
    def __init__(self, ssm_dtype: torch.dtype = torch.float32) -> None:
        self.ssm_dtype = ssm_dtype
        self.conv: dict[str, torch.Tensor] = {}
        self.ssm: dict[str, torch.Tensor] = {}
        self._k: dict[str, torch.Tensor] = {}  # (b, kv_heads, capacity, head_dim)
        self._v: dict[str, torch.Tensor] = {}
        self._len: dict[str, int] = {}
        self._reserved = 0  # KV capacity to allocate on first use
        self._tracking = False
        self._pending: dict[str, tuple] = {}  # key -> what keep(n) needs (see module docstring)

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
            # zeros, not empty: a static cache attends over the unwritten tail (masked), and masked
            # garbage that happens to be NaN would still poison the output (0 * NaN)
            self._k[key] = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
            self._v[key] = v.new_zeros(self._k[key].shape)
        elif buf_k.shape[2] < new:
            self._grow(key, max(new, 2 * buf_k.shape[2], self._reserved))
        self._k[key][:, :, old:new] = k.detach()
        self._v[key][:, :, old:new] = v.detach()
        self._len[key] = new
        if self._tracking:
            self._pending[key] = ("kv", old)
        return self._k[key][:, :, :new], self._v[key][:, :, :new], old

    def kv_lengths(self) -> dict[str, int]:
        """Tokens cached by each attention layer."""
        return dict(self._len)

    def kv_buffers(self, capacity: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each attention layer's whole key and value buffers (b, kv_heads, capacity, d), grown to
        ``capacity`` first where smaller: what a fixed-address cache adopts (kinetic.infer.static_cache)."""
        for key, buf in self._k.items():
            if buf.shape[2] < capacity:
                self._grow(key, capacity)
        return {key: (self._k[key], self._v[key]) for key in self._k}

    # ---- undoing positions
    @contextlib.contextmanager
    def tracking(self):
        """Within this context, forward passes record what ``keep(n)`` needs (replacing earlier
        records of the same layer)."""
        self._pending.clear()
        self._tracking = True
        try:
            yield self
        finally:
            self._tracking = False

    @property
    def is_tracking(self) -> bool:
        return self._tracking

    def track_mamba(self, key: str, window: torch.Tensor, states: torch.Tensor, kernel: int) -> None:
        """Called by a Mamba layer: ``window`` (b, conv_dim, kernel-1+L) holds the conv state before
        the L new positions followed by their conv inputs; ``states`` (b, L, h, p, n) the SSM state
        after each of them."""
        self._pending[key] = ("mamba", window.detach(), states.detach(), kernel)

    def keep(self, n: int) -> None:
        """Keep the first ``n`` positions of the tracked forward pass and forget the rest."""
        for key, rec in self._pending.items():
            if rec[0] == "kv":
                _, old = rec
                if n > self._len[key] - old:
                    raise ValueError(f"keep({n}) but layer {key} took {self._len[key] - old} positions")
                self._len[key] = old + n
                continue
            _, window, states, kernel = rec
            if not 0 < n <= states.shape[1]:
                raise ValueError(f"keep({n}) must be in [1, {states.shape[1]}] for layer {key}")
            self.conv[key] = window[..., n:n + kernel - 1].clone()
            self.ssm[key] = states[:, n - 1].to(self.ssm_dtype)
        self._pending.clear()

    def snapshot(self) -> _Snapshot:
        """A bookmark of the current state for ``restore`` (references, no copies)."""
        return _Snapshot(dict(self.conv), dict(self.ssm), dict(self._len))

    def restore(self, snap: _Snapshot) -> None:
        self.conv, self.ssm, self._len = dict(snap.conv), dict(snap.ssm), dict(snap.lengths)
        for key in [k for k in self._k if k not in self._len]:  # layers first used after the bookmark
            del self._k[key], self._v[key]
        self._pending.clear()

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
