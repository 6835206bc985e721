"""A FLOPs model of NemotronH and the machine's matmul peak, for model-FLOPs-utilization (MFU).

N counts the matmul parameters a token touches (every Linear at its active size: Mamba in/out
projections; q, k, v, o; dense MLPs; the MoE router, latent projections, shared expert and the
num_experts_per_tok routed experts; lm_head), leaving out the embedding table, norms, depthwise
convolution, biases and the Mamba A/D/dt vectors. Per token, a forward costs

    2 N + attention (2 * 2 * n_attn * seq * heads * head_dim / 2: QK^T and PV, causal half)
        + SSD (n_mamba * heads * (Q (N_s + P) + 4 N_s P), Q = min(chunk, seq): the chunked scan's
          intra-chunk C B^T and scores @ X, the chunk states B^T X and the read-out C h)

and forward+backward three times that. With ``include_mtp`` each MTP depth adds its eh_proj, its
blocks and one more lm_head.
"""

from __future__ import annotations

import time

import torch

from kinetic.config import ModelConfig


def _mixer_matmul(c: ModelConfig, kind: str) -> int:
    d = c.hidden_size
    if kind == "M":
        return d * (c.mamba_intermediate_size + c.mamba_conv_dim + c.mamba_num_heads) + \
            c.mamba_intermediate_size * d
    if kind == "*":
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        return 2 * d * q + 2 * d * kv
    if kind == "-":
        return 2 * d * c.intermediate_size
    width = c.moe_latent_size or d
    n = c.n_routed_experts * d + c.num_experts_per_tok * 2 * width * c.moe_intermediate_size
    if c.n_shared_experts:
        n += 2 * d * c.moe_shared_expert_intermediate_size
    if c.moe_latent_size is not None:
        n += 2 * d * width
    return n


def matmul_params(c: ModelConfig, include_mtp: bool = False) -> int:
    """Matmul parameters a token touches (lm_head included, embedding table excluded)."""
    n = c.vocab_size * c.hidden_size + sum(_mixer_matmul(c, k) for k in c.hybrid_override_pattern)
    if include_mtp:
        per_depth = 2 * c.hidden_size ** 2 + c.vocab_size * c.hidden_size
        per_depth += sum(_mixer_matmul(c, k) for k in c.mtp_hybrid_override_pattern)
        n += c.num_nextn_predict_layers * per_depth
    return n


def flops_per_token(c: ModelConfig, seq: int, include_mtp: bool = False) -> dict[str, float]:
    """Forward FLOPs per token split into matmul / attention / SSD, and forward+backward."""
    pattern = c.hybrid_override_pattern
    if include_mtp:
        pattern += c.mtp_hybrid_override_pattern * c.num_nextn_predict_layers
    matmul = 2.0 * matmul_params(c, include_mtp)
    attn = 2 * 2 * pattern.count("*") * seq * c.num_attention_heads * c.head_dim / 2
    q, ns, p = min(c.chunk_size, seq), c.ssm_state_size, c.mamba_head_dim
    ssd = pattern.count("M") * c.mamba_num_heads * (q * (ns + p) + 4 * ns * p)
    forward = matmul + attn + ssd
    return {"matmul": matmul, "attention": float(attn), "ssd": float(ssd), "forward": forward,
            "fwd+bwd": 3 * forward}


def measure_peak(size: int = 2048, repeats: int = 10, device: str | torch.device = "cpu") -> float:
    """Best fp32 matmul rate in GFLOP/s over ``repeats`` products of two size x size matrices on
    ``device`` (on a GPU each product is timed to its completion)."""
    device = torch.device(device)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b, out=out)  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9
