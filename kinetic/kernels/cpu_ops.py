"""The C kernels (``kinetic/kernels/*.c``, built and loaded by :mod:`kinetic.kernels.cpu`) as
implementations of the operations, wrapped in autograd functions where they have a backward pass.

Each takes a call only where :mod:`kinetic.kernels.cpu` says it can run it (x86-64 Linux, float32
CPU tensors, outside ``torch.compile``, sizes it handles) and where it pays on this CPU: built for
AVX-512 every kernel beats torch's path; built for narrower SIMD (AVX2) some lose to it, and
``PAYS_WITHOUT_AVX512`` says which calls they still take there (benchmarks/ops.py measures both;
``KINETIC_KERNEL_MARCH=haswell`` builds the AVX2 kernels on any x86-64 CPU).
``KINETIC_CPU_KERNELS=0`` turns all of them off.

The Mamba-2 kernels write their input gradients straight into the buffer of the split that made
their inputs (:mod:`kinetic.kernels.shared_grad`): :func:`shared_split`, the ``split_channels``
implementation, tags each slice with its place in that buffer, and the conv and gated-norm
functions below look for the tag.
"""

from __future__ import annotations

import torch

from kinetic.kernels import Implementation, needs_grad, ssd
from kinetic.kernels import cpu as cpu_kernels
from kinetic.kernels.shared_grad import SharedGrad, split_shared

GRAD_INTO = "_kinetic_grad_into"  # the attribute of a slice made by shared_split: (SharedGrad, index)


def _grad_into(t: torch.Tensor):
    return getattr(t, GRAD_INTO, None)


# Without AVX-512 (benchmarks/ops.py, AVX2 build): the experts kernel loses to torch's grouped paths
# at training sizes (it wins on a decode step or verification, where the gathered-experts path is
# asked first anyway), and the causal-attention kernel wins forward + backward but not forward alone;
# the scan, conv, norms, routing and the shared-gradient split win there too.
SMALL_CALL = 16  # expert assignments of a decode step or verification, at most
PAYS_WITHOUT_AVX512 = {  # the kernels not named here win on AVX2 builds too
    "routed_experts": lambda x, indices: not torch.is_grad_enabled() and indices.numel() <= 2 * SMALL_CALL,
    "causal_attention": lambda q, k, v: needs_grad(q, k, v),
}


def _pays(op: str, *args) -> bool:
    """Whether the kernel for ``op`` beats torch's path on this call here (see PAYS_WITHOUT_AVX512)."""
    return cpu_kernels.wide_simd() or PAYS_WITHOUT_AVX512[op](*args)


# ---------------------------------------------------------------------- split with shared gradients
def shared_split(x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    slices, shared = split_shared(x, sizes)
    for index, piece in enumerate(slices):
        setattr(piece, GRAD_INTO, (shared, index))
    return slices


def _shared_split_fits(x: torch.Tensor, sizes: list[int]) -> bool:
    return (needs_grad(x) and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling() and not cpu_kernels.stepped_aside()
            and cpu_kernels.mamba_kernels_available())


# ---------------------------------------------------------------------- norms
class _RMSNormC(torch.autograd.Function):
    """RMSNorm in C on CPUs (float32; the gated norm's kernel without a gate, one group): one pass
    each way, the backward's weight gradient summed per thread."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        out, rstd = cpu_kernels.gated_norm_forward(x, None, weight, x.shape[-1], eps, keep=True)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dx, _, dweight = cpu_kernels.gated_norm_backward(x, None, weight, rstd, grad, x.shape[-1])
        return dx, dweight, None



def _rms_norm_c(x, weight, eps):
    return _RMSNormC.apply(x, weight, eps)


def _rms_norm_fits(x, weight, eps):
    return (x.device.type == "cpu" and needs_grad(x, weight)
            and cpu_kernels.gated_norm_fits(x, None, weight, x.shape[-1]))


class _GatedRMSNormC(torch.autograd.Function):
    """Mamba-2's gated RMSNorm in C on CPUs (float32; ``kinetic/kernels/mamba.c``): one pass over x
    and the gate forward, keeping only each group's 1/rms; the backward recomputes silu(gate) and the
    product."""

    @staticmethod
    def forward(ctx, x, gate, weight, group_size: int, eps: float, grad_into=None):
        out, rstd = cpu_kernels.gated_norm_forward(x, gate, weight, group_size, eps, keep=True)
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.group_size = group_size
        ctx.grad_into = grad_into
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, gate, weight, rstd = ctx.saved_tensors
        into = ctx.grad_into
        dgate = into[0].destination(into[1]) if into is not None and ctx.needs_input_grad[1] else None
        return (*cpu_kernels.gated_norm_backward(x, gate, weight, rstd, grad, ctx.group_size, dgate),
                None, None, None)


def _gated_norm_c(x, gate, weight, group_size, eps):
    if not torch.is_grad_enabled():
        return cpu_kernels.gated_norm_forward(x, gate, weight, group_size, eps, keep=False)[0]
    return _GatedRMSNormC.apply(x, gate, weight, group_size, eps, _grad_into(gate))


def _gated_norm_fits(x, gate, weight, group_size, eps):
    return cpu_kernels.gated_norm_fits(x, gate, weight, group_size)


# ---------------------------------------------------------------------- causal conv + SiLU
class _CausalConvSiLUC(torch.autograd.Function):
    """Causal depthwise conv + SiLU in C on CPUs (``kinetic/kernels/mamba.c``): one pass each way,
    the pre-activation recomputed in the backward pass instead of stored. With ``grad_into`` (a
    SharedGrad and a slice index, see kinetic.kernels.shared_grad) x's gradient is written there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                grad_into: tuple[SharedGrad, int] | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.grad_into = grad_into
        return cpu_kernels.conv_silu_forward(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        into = ctx.grad_into
        gx = into[0].destination(into[1]) if into is not None and ctx.needs_input_grad[0] else None
        return (*cpu_kernels.conv_silu_backward(*ctx.saved_tensors, grad, gx), None)



def _conv_c(x, weight, bias, state=None):
    return _CausalConvSiLUC.apply(x, weight, bias, _grad_into(x))


def _conv_fits(x, weight, bias, state=None):
    return state is None and cpu_kernels.conv_silu_fits(x, weight)


# ---------------------------------------------------------------------- SSD scan
def _ssd_c(x, dt, A, B, C, chunk_size, initial_state=None, D=None):
    return ssd.grouped_scan(x, dt, A, B, C, chunk_size, initial_state, D, kernel=True)


# ---------------------------------------------------------------------- experts
def _route_c(scores, bias, n_group, topk_group, k):
    return cpu_kernels.route(scores, bias, n_group, topk_group, k)


def _route_fits(scores, bias, n_group, topk_group, k):
    return cpu_kernels.routing_fits(scores)


class _ExpertsC(torch.autograd.Function):
    """Every routed expert's up projection, squared ReLU and down projection, with the dispatch and
    combine around them, in C on CPUs (``kinetic/kernels/experts.c``): a thread takes whole experts,
    gathers their tokens' rows into a block of its own, runs the GEMMs through torch's BLAS
    single-threaded, applies the activation (forward) or its gradient (backward) and the combine
    weights while the expert's block is in cache; only the pre-activation is kept for the backward
    pass. torch's grouped matmul instead splits each small GEMM between the threads, and the
    gathered rows, the activation and the weighting are further passes and tensors.

    x (tokens, W); weight (rows,) the combine weight of each (token, expert) assignment sorted by
    expert, token_of (rows,) its token, ends (E,) each expert's last row + 1 -> y (tokens, W): each
    token's weighted expert outputs summed (one index_add)."""

    @staticmethod
    def forward(ctx, x, weight, up, down, token_of, ends):
        keep = any(ctx.needs_input_grad)
        ys, u = cpu_kernels.experts_forward(x, up, down, ends, keep, token_of, weight)
        if keep:
            ctx.save_for_backward(x, weight, up, down, token_of, ends, u)
        return ys.new_zeros(x.shape).index_add_(0, token_of, ys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, up, down, token_of, ends, u = ctx.saved_tensors
        dxs, dup, ddown, dw = cpu_kernels.experts_backward(x, up, down, ends, u, grad, token_of, weight)
        dx = dxs.new_zeros(x.shape).index_add_(0, token_of, dxs) if ctx.needs_input_grad[0] else None
        return dx, dw, dup, ddown, None, None



def _experts_c(x, indices, weights, up, down):
    order, token_of, ends = cpu_kernels.dispatch(indices, up.shape[0])
    w = weights.reshape(-1).index_select(0, order).float()  # sorted like the rows
    if not torch.is_grad_enabled():  # inference: the kernel without autograd's bookkeeping
        ys, _ = cpu_kernels.experts_forward(x, up, down, ends, False, token_of, w)
        return ys.new_zeros(x.shape).index_add_(0, token_of, ys)
    return _ExpertsC.apply(x, w, up, down, token_of, ends)


def _experts_fits(x, indices, weights, up, down):
    return cpu_kernels.experts_fit(x, up, down) and _pays("routed_experts", x, indices)


# ---------------------------------------------------------------------- attention
class _CausalAttentionC(torch.autograd.Function):
    """Causal self-attention in C on CPUs (float32; ``kinetic/kernels/attention.c``): a thread per
    (batch, query head), blocks of 64 queries against the keys up to the block's end through torch's
    BLAS, the softmax in between; the backward recomputes the probabilities from each query's
    log-sum-exp. q (b, l, heads, d), k and v (b, l, kv_heads, d) in the projections' layout."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        keep = any(ctx.needs_input_grad)
        out, lse = cpu_kernels.attention_forward(q, k, v, scale, keep)
        if keep:
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        return (*cpu_kernels.attention_backward(q, k, v, out, lse, grad, ctx.scale), None)



def _attention_c(q, k, v):
    return _CausalAttentionC.apply(q, k, v, q.shape[-1] ** -0.5)


def _attention_fits(q, k, v):
    return q.shape[1] > 1 and cpu_kernels.attention_fits(q, k, v) and _pays("causal_attention", q, k, v)


def _decode_c(q, k, v, start):
    return cpu_kernels.decode_attention(q, k, v)


def _decode_fits(q, k, v, start):
    return (isinstance(start, int) and q.shape[2] == 1 and k.shape[2] == start + 1
            and cpu_kernels.decode_attention_fits(q, k, v))


# ---------------------------------------------------------------------- LM-head logits
# BLAS GEMMs of 2-4 rows cost about as much as that many one-row products; with the operands swapped,
# W @ h^T, a speculative verification's logits are faster (benchmarks/ops.py, lm_head_logits)
SWAPPED_HEAD_ROWS = (2, 3, 4)


def _head_inference(hidden, weight) -> bool:
    return (hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not cpu_kernels.stepped_aside())


def _row_count(hidden) -> int:
    return hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0


def swapped_head(hidden, weight):
    rows, width = _row_count(hidden), hidden.shape[-1]
    out = torch.mm(weight, hidden.reshape(rows, width).t()).t().contiguous()
    return out.view(*hidden.shape[:-1], weight.shape[0])


def huge_page_head(hidden, weight):
    """Logits written into transparent huge pages: one page fault per 2 MiB of a large fresh buffer
    instead of one per 4 KiB (see kinetic.kernels.cpu.empty_huge)."""
    rows, width = _row_count(hidden), hidden.shape[-1]
    out = cpu_kernels.empty_huge(rows, weight.shape[0], dtype=hidden.dtype)
    torch.mm(hidden.reshape(rows, width), weight.t(), out=out)
    return out.view(*hidden.shape[:-1], weight.shape[0])


def _swapped_fits(hidden, weight):
    return _head_inference(hidden, weight) and _row_count(hidden) in SWAPPED_HEAD_ROWS


def _huge_fits(hidden, weight):
    return (_head_inference(hidden, weight)
            and _row_count(hidden) * weight.shape[0] * 4 >= cpu_kernels.HUGE_PAGE_MIN_BYTES)


IMPLEMENTATIONS = [
    Implementation("split_channels", "cpu.shared-gradient", shared_split, _shared_split_fits),
    Implementation("rms_norm", "cpu.c", _rms_norm_c, _rms_norm_fits),
    Implementation("gated_rms_norm", "cpu.c", _gated_norm_c, _gated_norm_fits),
    Implementation("causal_conv1d_silu", "cpu.c", _conv_c, _conv_fits),
    Implementation("ssd_chunk_scan", "cpu.c", _ssd_c, ssd.kernel_fits),
    Implementation("route_topk", "cpu.c", _route_c, _route_fits),
    Implementation("routed_experts", "cpu.c", _experts_c, _experts_fits),
    Implementation("causal_attention", "cpu.c", _attention_c, _attention_fits),
    Implementation("cached_attention", "cpu.c-decode", _decode_c, _decode_fits),
    Implementation("lm_head_logits", "cpu.swapped-gemm", swapped_head, _swapped_fits),
    Implementation("lm_head_logits", "cpu.huge-pages", huge_page_head, _huge_fits),
]
