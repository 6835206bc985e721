"""Squared ReLU, the activation of NemotronH's MLPs and experts, as an operation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinetic.ops.registry import operation


@operation("relu_squared")
def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """``relu(x) ** 2``."""
    return F.relu(x).square()
