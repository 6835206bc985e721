"""Fast implementations of the operations in :mod:`kinetic.ops`.

Each module here exports ``IMPLEMENTATIONS``, a list of :class:`Implementation` records that the
operation table registers on its first call; none of them is imported by model code.

- :mod:`kinetic.kernels.cpu_ops`: C kernels for x86-64 CPUs (sources ``*.c`` beside it, built and
  loaded by :mod:`kinetic.kernels.cpu`), wrapped as autograd functions;
- :mod:`kinetic.kernels.sdpa`: attention paths over torch's ``scaled_dot_product_attention`` and its
  flash kernels (split-KV decoding, chunks after a cache, grouped heads);
- :mod:`kinetic.kernels.torch_ops`: torch compositions with hand-written backward passes, grouped
  matmuls for the experts, the chunked LM-head loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Implementation:
    """A faster way to compute operation ``op``: ``fn`` takes the operation's arguments and runs when
    ``fits`` (given the same arguments) returns True; ``name`` names it in tests and benchmarks.
    An operation asks its implementations in order of ``priority`` (lowest first)."""

    op: str
    name: str
    fn: Callable
    fits: Callable[..., bool]
    priority: int = 50


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd is recording and one of ``tensors`` requires a gradient (a training call)."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def always(*args, **kwargs) -> bool:
    """The capability check of an implementation that takes every call of its operation."""
    return True
