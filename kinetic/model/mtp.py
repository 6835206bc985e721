"""Multi-token prediction (MTP) layers in the layout of NVIDIA's released checkpoints.

Depth d (1-based) predicts token i+1+d at position i:

    x = eh_proj(concat[enorm(embed(token i+d)), hnorm(h_i)])
    x = blocks of ``mtp_hybrid_override_pattern`` (ordinary NemotronH blocks)
    logits = lm_head(final_layernorm(x))

For depth 1, h is the main model's final-normed hidden state; a deeper depth takes the previous
depth's block output (before its final_layernorm), as Megatron-LM chains MTP modules. Depth d owns
``mtp.layers[(d-1)*P : d*P]`` with P the pattern length: the first holds enorm/hnorm/eh_proj, the
last holds final_layernorm. The lm_head is shared with the main model.
"""

from __future__ import annotations

import torch
from torch import nn

from kinetic.config import ModelConfig
from kinetic.model.blocks import Block
from kinetic.model.norm import RMSNorm


class MTPLayer(Block):
    def __init__(self, config: ModelConfig, kind: str, cache_key: str, first: bool, last: bool):
        super().__init__(config, kind, cache_key)
        eps, hidden = config.layer_norm_epsilon, config.hidden_size
        if first:
            self.enorm = RMSNorm(hidden, eps)
            self.hnorm = RMSNorm(hidden, eps)
            self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        if last:
            self.final_layernorm = RMSNorm(hidden, eps)


class MTP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        pattern = config.mtp_hybrid_override_pattern
        self.pattern_len = len(pattern)
        self.depths = config.num_nextn_predict_layers
        self.layers = nn.ModuleList(
            MTPLayer(config, kind, f"mtp.layers.{d * len(pattern) + j}", first=j == 0,
                     last=j == len(pattern) - 1)
            for d in range(self.depths) for j, kind in enumerate(pattern)
        )

    def depth_layers(self, depth: int) -> list[MTPLayer]:
        """Layers of depth ``depth`` (0-based)."""
        start = depth * self.pattern_len
        return [self.layers[i] for i in range(start, start + self.pattern_len)]  # (slicing a
        # ModuleList builds a new ModuleList: 46 us a call, two calls per speculative round)

    def forward_depth(self, depth: int, hidden: torch.Tensor, next_embeds: torch.Tensor,
                      cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One depth: hidden (b, l, d) and the embeddings of the tokens one ahead (b, l, d) ->
        (block output for the next depth, final-normed hidden for the lm_head)."""
        layers = self.depth_layers(depth)
        first = layers[0]
        x = first.eh_proj(torch.cat([first.enorm(next_embeds), first.hnorm(hidden)], dim=-1))
        for layer in layers:
            x = layer(x, cache)
        return x, layers[-1].final_layernorm(x)
