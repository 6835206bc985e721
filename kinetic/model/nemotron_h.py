"""NemotronHForCausalLM: embeddings, the hybrid block stack, final norm, LM head, and MTP layers.

Module names follow the Hugging Face checkpoint (``backbone.embeddings``, ``backbone.layers.N``,
``backbone.norm_f``, ``lm_head``, ``mtp.layers.N``), so a state dict maps onto safetensors keys with
only the per-expert split done in :mod:`kinetic.hf`. The forward is pure: ``(input_ids, cache)`` ->
outputs; sampling and speculative decoding live outside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kinetic import hf, ops
from kinetic.config import ModelConfig
from kinetic.model.blocks import Block
from kinetic.model.cache import Cache
from kinetic.model.mamba2 import Mamba2Mixer
from kinetic.model.moe import MoE
from kinetic.model.mtp import MTP
from kinetic.model.norm import RMSNorm


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (batch, seq, vocab), float32; None when only a loss was asked for
    hidden_states: torch.Tensor  # final-normed last hidden state (batch, seq, hidden)
    mtp_logits: list[torch.Tensor] | None = None  # depth d: (batch, seq - d, vocab), predicts t+1+d
    loss: torch.Tensor | None = None  # next-token cross-entropy when labels are given
    mtp_losses: list[torch.Tensor] | None = None  # per MTP depth d: predicting labels shifted by 1+d


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, kind, f"layers.{i}") for i, kind in enumerate(config.hybrid_override_pattern)
        )
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, cache)
        return self.norm_f(x)


class NemotronHForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.mtp = MTP(config) if config.num_nextn_predict_layers else None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        labels: torch.Tensor | None = None,
        return_mtp: bool | None = None,
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids (batch, seq). MTP outputs are computed by default when there is no cache.

        ``labels`` (batch, seq; -100 = ignore) gives ``loss``, the mean cross-entropy of position i
        predicting label i+1 (labels are shifted inside, as in transformers), and ``mtp_losses``
        (depth d predicts label i+1+d). Labels may be one token longer than the input (a training
        window whose last token is only a target), so every position gets a target. The loss is
        fused with the LM head in chunks, so with labels the logits are not built unless
        ``return_logits=True``.
        ``logits_to_keep=k`` computes logits for the last k positions only (0 = all).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq); got shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        if labels is not None and (labels.shape[0] != input_ids.shape[0]
                                   or labels.shape[1] not in (seq, seq + 1)):
            raise ValueError(f"labels shape {tuple(labels.shape)} must be {tuple(input_ids.shape)} or "
                             f"one token longer (the window's next token) for input_ids "
                             f"{tuple(input_ids.shape)}")
        hidden = self.backbone(input_ids, cache)
        logits = None
        if return_logits if return_logits is not None else labels is None:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = ops.lm_head_logits(kept, self.lm_head.weight).float()
        out = CausalLMOutput(logits=logits, hidden_states=hidden)
        if labels is not None:
            n = min(seq, labels.shape[1] - 1)  # positions that have a next label
            out.loss = ops.linear_cross_entropy(hidden[:, :n], self.lm_head.weight, labels[:, 1:1 + n])
        if self.mtp is not None and (return_mtp if return_mtp is not None else cache is None):
            mtp_hidden = self.mtp_hidden(hidden, input_ids)
            if labels is None or return_logits:
                out.mtp_logits = [ops.lm_head_logits(h, self.lm_head.weight).float() for h in mtp_hidden]
            if labels is not None:
                out.mtp_losses = []
                for d, h in enumerate(mtp_hidden):  # depth d+1 at position i predicts label i+2+d
                    m = min(h.shape[1], labels.shape[1] - 2 - d)
                    if m > 0:
                        out.mtp_losses.append(ops.linear_cross_entropy(
                            h[:, :m], self.lm_head.weight, labels[:, 2 + d:2 + d + m]))
        return out

    def mtp_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Final-normed hidden states of every MTP depth; depth d covers positions 0 .. seq-1-d."""
        out, h, seq = [], hidden, input_ids.shape[1]
        for depth in range(self.mtp.depths):
            shift = depth + 1
            if seq - shift <= 0:
                break
            next_embeds = self.backbone.embeddings(input_ids[:, shift:])
            h, normed = self.mtp.forward_depth(depth, h[:, : seq - shift], next_embeds)
            out.append(normed)
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **options) -> torch.Tensor:
        """Prompt + up to ``max_new_tokens`` tokens, like transformers' ``generate`` (greedy by
        default); see :func:`kinetic.infer.generate.generate` for the options."""
        from kinetic.infer.generate import generate

        return generate(self, input_ids, max_new_tokens, **options)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Megatron-style init: N(0, initializer_range) for matrices, output projections of each
        residual branch scaled by 1/sqrt(2 * layers), Mamba A/D/dt as in Mamba-2, norms at 1.
        Only meaningful for fresh models; the conv keeps the init it got at construction."""
        c = self.config
        std = c.initializer_range
        out_std = std / math.sqrt(2 * max(c.num_hidden_layers, 1))
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name.rsplit(".", 2)[-2] or leaf in ("A_log", "D", "dt_bias") or "conv1d" in name:
                continue  # set below; the depthwise conv keeps PyTorch's default (fan-in) init
            if leaf == "bias":
                p.zero_()
            elif any(k in name for k in ("out_proj", "o_proj", "down_proj", "fc2_latent_proj")):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)
        for module in self.modules():
            if isinstance(module, RMSNorm) or hasattr(module, "group_size"):
                module.weight.fill_(1.0)
            if isinstance(module, Mamba2Mixer):
                h = module.num_heads
                module.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
                module.D.fill_(1.0)
                lo, hi = math.log(c.time_step_min), math.log(c.time_step_max)
                dt = torch.exp(torch.rand(h, generator=generator) * (hi - lo) + lo)
                dt = dt.clamp(min=c.time_step_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            if isinstance(module, MoE):
                module.gate.e_score_correction_bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> NemotronHForCausalLM:
        """A model built from ``path/config.json`` and filled from its safetensors (HF layout)."""
        config, disk = hf.read_checkpoint(path)
        with torch.device("meta"):
            model = cls(config)
        return hf.load_state(model, disk, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, *, max_shard_size: int = 5 * 2**30,
                        config_style: str = "pattern") -> Path:
        return hf.save_pretrained(self, path, max_shard_size=max_shard_size, config_style=config_style)
