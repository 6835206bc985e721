"""The squared-ReLU MLP used for dense ``-`` layers and for shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ReLU2(torch.autograd.Function):
    """relu(x)**2 with a two-pass backward (2 * relu(x) * grad); autograd's relu+pow takes five."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        if not ctx.needs_input_grad[0]:  # inference: square in place, one buffer instead of two
            return r.square_()
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return (r + r).mul_(grad)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, NemotronH's MLP activation."""
    if not torch.is_grad_enabled():  # inference: in place, without autograd.Function's overhead
        return F.relu(x).square_()
    return _ReLU2.apply(x)


class MLP(nn.Module):
    """``down(relu(up(x))**2)``: NemotronH MLPs have no gate projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))
