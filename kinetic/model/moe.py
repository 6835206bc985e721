"""NemotronH mixture of experts: sigmoid router with score-correction bias and group-limited
top-k, squared-ReLU experts, a shared expert, and the optional latent projections of latent MoE.

The choice of experts is :func:`kinetic.ops.route_topk` and the experts' work
:func:`kinetic.ops.routed_experts`; their references say exactly what is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinetic import ops
from kinetic.config import ModelConfig
from kinetic.model.mlp import MLP


def count_per_expert(flat_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert. Unlike ``torch.bincount`` on CUDA this never reads the maximum back to
    the host, so it neither stalls the GPU nor breaks CUDA-graph capture."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_indices.device)
    return counts.scatter_add_(0, flat_indices, torch.ones_like(flat_indices))


class TopKRouter(nn.Module):
    """Sigmoid scores; ``e_score_correction_bias`` (the aux-loss-free balancing bias) only steers
    which experts are chosen, the combine weights come from the unbiased scores."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (tokens, hidden) -> logits (tokens, E), weights (tokens, k) fp32, indices (tokens, k)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        indices = ops.route_topk(scores, self.e_score_correction_bias.float(), self.n_group, self.topk_group,
                                 self.top_k)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, weights * self.scaling, indices


class Experts(nn.Module):
    """All routed experts as two 3-D parameters (experts, out, in); on disk each expert is stored
    as its own 2-D ``experts.{e}.up_proj.weight`` / ``down_proj.weight`` (see kinetic.hf)."""

    def __init__(self, num_experts: int, width: int, intermediate: int) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, width))
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, intermediate))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (tokens, width), indices/weights (tokens, k) -> (tokens, width)."""
        return ops.routed_experts(x, indices, weights, self.up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, cache_key: str = "") -> None:
        super().__init__()
        width = config.moe_latent_size or config.hidden_size
        self.gate = TopKRouter(config)
        self.experts = Experts(config.n_routed_experts, width, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_shared_expert_intermediate_size, config.mlp_bias)
            if config.n_shared_experts else None
        )
        if config.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        # Balancing hooks read by kinetic.train.balance: tokens routed to each expert by the last
        # forward (counted when read, from its routing), and (when ``compute_balance_loss`` is set, in
        # training) the sequence-level balance statistic sum_i f_i * P_i of DeepSeek-V3 / Nemotron 3,
        # averaged over sequences.
        self._last_indices: torch.Tensor | None = None
        self.compute_balance_loss = False
        self.balance_loss: torch.Tensor | None = None

    @property
    def last_tokens_per_expert(self) -> torch.Tensor | None:
        """Tokens routed to each expert by the last forward (None before the first)."""
        if self._last_indices is None:
            return None
        return count_per_expert(self._last_indices.reshape(-1), self.gate.num_experts)

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        logits, weights, indices = self.gate(x)
        self._last_indices = indices.detach()
        if self.training and self.compute_balance_loss and hidden.dim() == 3:
            self.balance_loss = sequence_balance_loss(logits, indices, shape[0])
        if self.fc1_latent_proj is not None:
            x = self.fc1_latent_proj(x)
        y = self.experts(x, indices, weights)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        y = y.view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden)
        return y


def sequence_balance_loss(logits: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
    """Per sequence: f_i = E / (k T) * (tokens routed to expert i), P_i = mean over tokens of the
    normalized sigmoid score s_i / sum_j s_j; returns mean over sequences of sum_i f_i P_i (1.0 when
    perfectly balanced). Gradients flow through P only."""
    num_experts = logits.shape[-1]
    scores = logits.sigmoid().view(batch, -1, num_experts)
    probs = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (batch, E)
    per_seq = indices.view(batch, -1)
    counts = torch.zeros(batch, num_experts, device=logits.device).scatter_add_(
        1, per_seq, torch.ones_like(per_seq, dtype=torch.float32))
    f = counts * num_experts / per_seq.shape[1]  # per_seq holds T * k assignments
    return (f.detach() * probs).sum(-1).mean()
