"""Splitting a tensor into slices whose gradients are written in place.

``torch.split`` costs nothing forward, but its backward concatenates the slices' gradients into a
new tensor (and a slice's backward alone zero-fills a tensor of the whole size and copies into it).
For Mamba-2's input projection (z, xBC and dt in one (batch, seq, 2 inner + 2 groups x state +
heads) output) that is an allocation and a copy of the whole projection's size per layer and step.
:func:`split_shared` returns the same slices plus a :class:`SharedGrad`; a consumer whose backward
can write into a strided destination (kinetic's C conv, gated norm and chunk-scan kernels) asks it
for its slice of one gradient buffer and writes there, and the split's backward then copies only
what did not arrive in place (a slice nobody wrote gets its gradient copied, or zeros if it has
none).
"""

from __future__ import annotations

import itertools

import torch


class SharedGrad:
    """The gradient buffer of a tensor split into slices along ``dim``, allocated by the first
    backward that asks for a slice of it and handed over, whole, by the split's backward."""

    def __init__(self, like: torch.Tensor, sizes: list[int], dim: int) -> None:
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.dim = dim % like.dim()
        ends = list(itertools.accumulate(sizes))
        self.bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        self._buffer: torch.Tensor | None = None
        self.copied: list[int] = []  # the slices the last backward pass had to copy or zero-fill

    def destination(self, index: int) -> torch.Tensor:
        """Where slice ``index``'s gradient goes: its part of the shared buffer."""
        if self._buffer is None:
            self._buffer = self._new_buffer()
        lo, hi = self.bounds[index]
        return self._buffer.narrow(self.dim, lo, hi - lo)

    def take(self) -> torch.Tensor:
        """The buffer (a new one if no slice asked for it); the next backward pass starts afresh."""
        buffer = self._buffer
        self._buffer = None
        return buffer if buffer is not None else self._new_buffer()

    def _new_buffer(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


class _SplitShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shared: SharedGrad):
        ctx.shared = shared
        ctx.set_materialize_grads(False)  # an unused slice's gradient comes as None: zero-filled below
        return tuple(x.narrow(shared.dim, lo, hi - lo) for lo, hi in shared.bounds)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        shared = ctx.shared
        buffer = shared.take()
        shared.copied = []
        for index, (grad, (lo, hi)) in enumerate(zip(grads, shared.bounds, strict=True)):
            dst = buffer.narrow(shared.dim, lo, hi - lo)
            if grad is not None and grad.data_ptr() == dst.data_ptr() and grad.stride() == dst.stride():
                continue  # written in place
            shared.copied.append(index)
            if grad is None:
                dst.zero_()
            else:
                dst.copy_(grad)
        return buffer, None


def split_shared(x: torch.Tensor, sizes: list[int], dim: int = -1
                 ) -> tuple[tuple[torch.Tensor, ...], SharedGrad]:
    """``torch.split(x, sizes, dim)`` whose backward concatenates nothing that its consumers wrote in
    place (see the module docstring). For autograd outside ``torch.compile``; elsewhere use
    ``torch.split``."""
    if not -x.dim() <= dim < x.dim() or sum(sizes) != x.shape[dim] or min(sizes, default=0) < 0:
        raise ValueError(f"split_shared: sizes {sizes} (summing to {sum(sizes)}) do not split dimension "
                         f"{dim} of x {tuple(x.shape)}; expected non-negative sizes adding up to its length")
    shared = SharedGrad(x, sizes, dim)
    return _SplitShared.apply(x, shared), shared
