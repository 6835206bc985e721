"""A NemotronH block: pre-norm residual around one mixer chosen by the pattern character."""

from __future__ import annotations

import torch
from torch import nn

from kinetic.config import ModelConfig
from kinetic.model.attention import Attention
from kinetic.model.mamba2 import Mamba2Mixer
from kinetic.model.mlp import MLP
from kinetic.model.moe import MoE
from kinetic.model.norm import RMSNorm


def build_mixer(kind: str, config: ModelConfig, cache_key: str) -> nn.Module:
    if kind == "M":
        return Mamba2Mixer(config, cache_key)
    if kind == "*":
        return Attention(config, cache_key)
    if kind == "E":
        return MoE(config, cache_key)
    if kind == "-":
        return _DenseMLP(config)
    raise ValueError(f"unknown block kind {kind!r}")


class _DenseMLP(MLP):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return super().forward(x)


class Block(nn.Module):
    """``x + mixer(norm(x))``; ``kind`` is one of M * - E."""

    def __init__(self, config: ModelConfig, kind: str, cache_key: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = build_mixer(kind, config, cache_key)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), cache)
