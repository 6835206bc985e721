"""The decoding-cache interface the layers use; the caches themselves live in :mod:`kinetic.infer`.

A cache holds, per layer (keyed by the mixer's ``cache_key``, e.g. ``layers.5``), what decoding must
remember: a Mamba layer's conv window and SSM state (constant size), an attention layer's keys and
values. In a speculative verification the cache is tracking (``is_tracking``): Mamba layers then also
report each new position's state (``track_mamba``) so that the cache can later keep only the accepted
ones, row by row (:class:`kinetic.infer.slots.SlotCache`).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Cache(Protocol):
    is_tracking: bool  # a verification: Mamba layers report every position's state

    def has_state(self, key: str) -> bool:
        """Whether the Mamba layer ``key`` has seen a token."""

    def mamba_state(self, key: str, conv_shape: tuple, ssm_shape: tuple,
                    like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (conv state (b, conv, k-1), SSM state (b, h, p, n)); zeros before its first
        token, created like ``like`` (device, dtype)."""

    def set_conv_state(self, key: str, state: torch.Tensor) -> None: ...

    def set_ssm_state(self, key: str, state: torch.Tensor) -> None: ...

    def track_mamba(self, key: str, window: torch.Tensor, states: torch.Tensor, kernel: int) -> None:
        """In a tracked forward of L tokens: ``window`` (b, conv, kernel-1+L), the conv state before the
        tokens followed by their conv inputs; ``states`` (b, L, h, p, n), the SSM state after each."""

    def append_kv(self, key: str, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
        """Write the new keys/values (b, kv_heads, s, d) of attention layer ``key``; return the keys and
        values to attend over (b, kv_heads, n, d) and the position of the first new one (an int; a
        0-d device tensor where it must not be read back to the host; a (b,) tensor when the rows
        are at different positions), as :func:`kinetic.ops.cached_attention` takes them."""
