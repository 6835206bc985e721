"""Parameter counts of a ModelConfig by arithmetic (no tensors are allocated)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kinetic.config import ModelConfig


def _mixer_params(c: ModelConfig, kind: str) -> tuple[int, int]:
    """(total, active) parameters of one mixer, without its pre-norm."""
    d = c.hidden_size
    if kind == "M":
        inner, conv = c.mamba_intermediate_size, c.mamba_conv_dim
        n = d * (inner + conv + c.mamba_num_heads) + (inner + conv + c.mamba_num_heads) * c.use_bias
        n += conv * c.conv_kernel + conv * c.use_conv_bias
        n += 3 * c.mamba_num_heads + inner  # dt_bias, A_log, D, gated norm
        n += inner * d + d * c.use_bias
        return n, n
    if kind == "*":
        q = c.num_attention_heads * c.head_dim
        kv = c.num_key_value_heads * c.head_dim
        n = d * q + 2 * d * kv + q * d
        return n, n
    if kind == "-":
        n = 2 * d * c.intermediate_size + (c.intermediate_size + d) * c.mlp_bias
        return n, n
    width = c.moe_latent_size or d
    router = c.n_routed_experts * d  # e_score_correction_bias is a buffer, not a parameter
    expert = 2 * width * c.moe_intermediate_size
    shared = 0
    if c.n_shared_experts:
        s = c.moe_shared_expert_intermediate_size
        shared = 2 * d * s + (s + d) * c.mlp_bias
    latent = 0
    if c.moe_latent_size is not None:
        latent = 2 * d * width + (width + d) * c.mlp_bias
    common = router + shared + latent
    return common + c.n_routed_experts * expert, common + c.num_experts_per_tok * expert


def count_params(c: ModelConfig) -> dict[str, int]:
    d = c.hidden_size
    embed = c.vocab_size * d
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    total, active = embed + head + d, c.vocab_size * d + d  # output projection + norm_f
    for kind in c.hybrid_override_pattern:
        t, a = _mixer_params(c, kind)
        total, active = total + t + d, active + a + d
    mtp = 0
    for _ in range(c.num_nextn_predict_layers):
        mtp += 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, final_layernorm
        mtp += sum(_mixer_params(c, k)[0] + d for k in c.mtp_hybrid_override_pattern)
    # a tied table is already counted in "active" as the output projection
    with_embed = active + (0 if c.tie_word_embeddings else embed)
    return {"total": total, "active": active, "active_with_embeddings": with_embed, "mtp": mtp}
