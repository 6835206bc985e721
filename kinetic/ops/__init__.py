"""The operations layer: each compute-heavy operation of the model is one named function here, with a
plain-torch reference and the faster implementations registered for it (see
:mod:`kinetic.ops.registry`). Model files call these; they never import a kernel.

The one operation not defined here is Mamba-2's chunked scan, ``ssd_chunk_scan``: its reference is
the readable heart of :mod:`kinetic.model.mamba2`, declared there with :func:`operation`.
"""

from kinetic.ops.attention import cached_attention, causal_attention
from kinetic.ops.conv import causal_conv1d_silu, split_channels
from kinetic.ops.loss import IGNORE_INDEX, linear_cross_entropy, lm_head_logits
from kinetic.ops.mlp import relu_squared
from kinetic.ops.moe import route_topk, routed_experts
from kinetic.ops.norm import gated_rms_norm, rms_norm
from kinetic.ops.registry import (
    chosen,
    fast_enabled,
    implementations,
    operation,
    operations,
    reference_only,
)

__all__ = [
    "IGNORE_INDEX", "cached_attention", "causal_attention", "causal_conv1d_silu", "chosen", "fast_enabled",
    "gated_rms_norm", "implementations", "linear_cross_entropy", "lm_head_logits", "operation",
    "operations", "reference_only", "relu_squared", "route_topk", "routed_experts", "rms_norm",
    "split_channels",
]
