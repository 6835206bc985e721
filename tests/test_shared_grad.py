"""kinetic.kernels.shared_grad: a split whose consumers write their gradients into one buffer."""

from __future__ import annotations

import pytest
import torch

from kinetic.kernels.shared_grad import SharedGrad, split_shared


class TimesThreeInPlace(torch.autograd.Function):
    """3 t, whose backward writes t's gradient into its slice of the shared buffer."""

    @staticmethod
    def forward(ctx, t, into):
        ctx.into = into
        return t * 3

    @staticmethod
    def backward(ctx, grad):
        dst = ctx.into[0].destination(ctx.into[1])
        torch.mul(grad, 3, out=dst)
        return dst, None


def loss_of(parts, shared=None):
    """Slice 0 times three (in place when ``shared`` is given), slice 1 squared, slice 2 unused."""
    first = TimesThreeInPlace.apply(parts[0], (shared, 0)) if shared is not None else parts[0] * 3
    return (first * torch.arange(first.numel()).view_as(first)).sum() + parts[1].square().sum()


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    """New gradient buffers start as NaN, so a slice the split forgot to fill shows."""
    monkeypatch.setattr(SharedGrad, "_new_buffer",
                        lambda self: torch.full(self.shape, float("nan"), dtype=self.dtype))


@pytest.mark.parametrize("dim", [-1, 1])
def test_split_shared_gives_torch_splits_gradients(dim):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 11, requires_grad=True)
    sizes = [4, 3, 2] if dim == 1 else [5, 4, 2]
    (loss_of(torch.split(x, sizes, dim=dim))).backward()
    want, x.grad = x.grad, None
    parts, shared = split_shared(x * 1, sizes, dim)  # a non-leaf, as in the model
    assert [p.shape for p in parts] == [p.shape for p in torch.split(x, sizes, dim=dim)]
    loss_of(parts, shared).backward()
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
    assert shared.copied == [1, 2]  # slice 0 arrived in place; 1 was copied, 2 zero-filled
    assert shared._buffer is None  # handed over: the split keeps no memory after its backward


def test_split_shared_without_in_place_consumers_and_twice_backward():
    torch.manual_seed(1)
    x = torch.randn(3, 10, requires_grad=True)
    loss_of(torch.split(x, [4, 4, 2], dim=-1)).backward()
    once, x.grad = x.grad.clone(), None
    parts, shared = split_shared(x * 1, [4, 4, 2])
    loss = loss_of(parts)  # nothing writes in place: the split copies everything
    loss.backward(retain_graph=True)
    assert shared.copied == [0, 1, 2]
    loss.backward()  # a second pass gets a fresh buffer, so the first pass's gradient stays intact
    torch.testing.assert_close(x.grad, 2 * once, rtol=0, atol=0)
    assert shared.copied == [0, 1, 2]  # this pass's copies only

    parts, shared = split_shared(x, [4, 4, 2])  # x itself: the buffer becomes x.grad
    loss = loss_of(parts, shared)
    x.grad = None
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(first, once, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, 2 * once, rtol=0, atol=0)


def test_split_shared_rejects_sizes_that_do_not_split():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"sizes \[2, 3\] \(summing to 5\) do not split dimension -1"):
        split_shared(x, [2, 3])
    with pytest.raises(ValueError, match="dimension 2 of x"):
        split_shared(x, [6], dim=2)
    with pytest.raises(ValueError, match="non-negative"):
        split_shared(x, [8, -2])
