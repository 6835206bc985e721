"""The squared-ReLU MLP used for dense ``-`` layers and for shared experts."""

from __future__ import annotations

import torch
from torch import nn

from kinetic import ops


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, NemotronH's MLP activation."""
    return ops.relu_squared(x)


class MLP(nn.Module):
    """``down(relu(up(x))**2)``: NemotronH MLPs have no gate projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))
