"""The mixture-of-experts operations: choosing experts, and running the chosen ones.

Changing either reference changes what the model means; the implementations registered for them
(in kinetic.kernels) are tested against these references, so a change here shows up there as a
failing test, and ``KINETIC_FAST_OPS=0`` runs the changed reference everywhere meanwhile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinetic.ops.registry import operation


@operation("route_topk")
def route_topk(scores: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int,
               k: int) -> torch.Tensor:
    """The experts each token routes to, (tokens, k) int64, best first: the top ``k`` of ``scores +
    bias`` (scores (tokens, E), the bias steering only the choice). With group-limited routing
    (``n_group`` > 1, ``topk_group`` < ``n_group``) only the ``topk_group`` groups whose two best
    choices sum highest stay eligible."""
    choice = scores + bias
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(-1, n_group, choice.shape[-1] // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (tokens, n_group)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)
    return choice.topk(k, dim=-1).indices


@operation("routed_experts")
def routed_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum of its experts' outputs: x (tokens, W); indices and weights (tokens,
    k), the chosen experts and their combine weights; up (E, I, W) and down (E, W, I), expert e
    computing ``down[e] @ relu(up[e] @ x) ** 2``. Sums in float32 (or wider); returns x's dtype."""
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for e in range(up.shape[0]):
        token, slot = (indices == e).nonzero(as_tuple=True)
        if token.numel():
            y = F.linear(F.relu(F.linear(x[token], up[e])).square(), down[e])
            out = out.index_add(0, token, y.to(out.dtype) * weights[token, slot, None].to(out.dtype))
    return out.to(x.dtype)
