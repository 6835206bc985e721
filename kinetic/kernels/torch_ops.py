"""Fast implementations in plain torch: hand-written backward passes that make fewer passes over
the activations than autograd's, in-place inference variants, the experts through grouped matmuls
(or one sorted pass per expert), and the LM-head loss in chunks of tokens that never builds the
whole logits tensor. Each is tested against its operation's reference in tests/test_ops.py;
benchmarks/ops.py times them against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinetic.kernels import Implementation, always, needs_grad, ssd
from kinetic.kernels import cpu as cpu_kernels


# ---------------------------------------------------------------------- norms
class _RMSNormFn(torch.autograd.Function):
    """``weight * x / rms(x)`` in float32 with a hand-written backward that saves what autograd's
    ``rms_norm`` saves (x and 1/rms) in fewer passes on CPU (benchmarks/ops.py). For CPU training;
    CUDA keeps torch's fused kernel."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        return (xf * rstd).mul_(weight.float()).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.float() * rstd
        grad = grad.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        gn = grad * weight.float()  # d loss / d xhat
        mean_dot = (gn * xhat).mean(-1, keepdim=True)
        grad_x = gn.sub_(xhat.mul_(mean_dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _gated_normalize(x, gate, group_size: int, eps: float):
    """float32 x, gate, silu(gate), rmsnorm_groups(x * silu(gate)) and its 1/rms per group."""
    *prefix, width = x.shape
    xf, gf = x.float(), gate.float()
    sg = F.silu(gf)
    h = (xf * sg).view(*prefix, width // group_size, group_size)
    sq = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_()
    rstd = sq.div_(group_size).add_(eps).rsqrt_()  # (..., groups, 1)
    normed = h.mul_(rstd).view(*prefix, width)  # h is a fresh product, normalized in place
    return xf, gf, sg, normed, rstd


class _GatedRMSNormFn(torch.autograd.Function):
    """``weight * rmsnorm_groups(x * silu(gate))`` with a hand-written backward: a few fused passes
    over the activations instead of the dozen or so autograd records through silu, mul, pow, mean,
    rsqrt and the weight product. Statistics in float32; the result in x's dtype."""

    @staticmethod
    def forward(ctx, x, gate, weight, group_size: int, eps: float):
        xf, gf, sg, normed, rstd = _gated_normalize(x, gate, group_size, eps)
        ctx.save_for_backward(xf, gf, sg, normed, rstd, weight)
        ctx.group_size, ctx.dtypes = group_size, (x.dtype, gate.dtype)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xf, gf, sg, normed, rstd, weight = ctx.saved_tensors
        gs = ctx.group_size
        *prefix, width = normed.shape
        grad = grad.float()
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad * normed).reshape(-1, width).sum(0).to(weight.dtype)
        gn = (grad * weight.float()).view(*prefix, width // gs, gs)  # d loss / d normalized
        nv = normed.view(*prefix, width // gs, gs)
        mean_dot = (gn * nv).sum(-1, keepdim=True).div_(gs)
        gh = gn.sub_(nv * mean_dot).mul_(rstd).view(*prefix, width)  # d loss / d (x * silu(gate))
        grad_x = (gh * sg).to(ctx.dtypes[0])
        grad_gate = torch.ops.aten.silu_backward(gh.mul_(xf), gf).to(ctx.dtypes[1])
        return grad_x, grad_gate, grad_weight, None, None




def _rms_norm_fn(x, weight, eps):
    return _RMSNormFn.apply(x, weight, eps)


def _gated_norm_fn(x, gate, weight, group_size, eps):
    return _GatedRMSNormFn.apply(x, gate, weight, group_size, eps)


# ---------------------------------------------------------------------- squared ReLU
class _ReLU2(torch.autograd.Function):
    """relu(x)**2 with a two-pass backward (2 * relu(x) * grad); autograd's relu+pow takes five."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        if not ctx.needs_input_grad[0]:  # inference: square in place, one buffer instead of two
            return r.square_()
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return (r + r).mul_(grad)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, NemotronH's MLP activation."""
    if not torch.is_grad_enabled():  # inference: in place, without autograd.Function's overhead
        return F.relu(x).square_()
    return _ReLU2.apply(x)



# ---------------------------------------------------------------------- causal conv + SiLU
class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (b, l, c), weight (c, k), bias (c,) -> silu(causal_conv(x)) as (b, l, c).

        Tap k-1 meets x[t] at output t, tap k-1-s meets x[t - s]: the first tap (with the bias)
        writes the output, the others add into its shifted slices, so x is never padded or copied."""
        k, seqlen = weight.shape[1], x.shape[1]
        pre = torch.mul(x, weight[:, k - 1]) if bias is None else torch.addcmul(bias, x, weight[:, k - 1])
        for s in range(1, min(k, seqlen + 1)):
            pre[:, s:].addcmul_(x[:, : seqlen - s], weight[:, k - 1 - s])
        ctx.save_for_backward(x, weight, pre)
        ctx.has_bias = bias is not None
        return F.silu(pre)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, pre = ctx.saved_tensors
        k, seqlen = weight.shape[1], pre.shape[1]
        gp = torch.ops.aten.silu_backward(grad, pre)  # d loss / d pre-activation
        gx = gp * weight[:, k - 1]
        for s in range(1, min(k, seqlen + 1)):  # x[t] feeds pre[t + s] through tap k-1-s
            gx[:, : seqlen - s].addcmul_(gp[:, s:], weight[:, k - 1 - s])
        # weight gradient, one per-channel dot product per tap. On CPU per sequence, so that each
        # product stays in cache; on accelerators one batched product per tap (fewer launches).
        gw = weight.new_zeros(weight.shape)
        pairs = zip(x.unbind(0), gp.unbind(0), strict=True) if x.device.type == "cpu" else [(x, gp)]
        for xb, gpb in pairs:
            for s in range(min(k, seqlen + 1)):
                prod = xb[..., : seqlen - s, :] * gpb[..., s:, :]
                gw[:, k - 1 - s] += prod.reshape(-1, prod.shape[-1]).sum(0)
        gb = gp.sum((0, 1)) if ctx.has_bias else None
        return gx, gw, gb




def _conv_fn(x, weight, bias, state=None):
    return _CausalConvSiLU.apply(x, weight, bias)


def _conv_after_state(x, weight, bias, state):
    """A few tokens after a cache's conv state (a speculative verification): each position's taps
    times the weights, summed as the single-token step sums them, in three operations whatever the
    length (benchmarks/ops.py: against F.conv1d on such short windows)."""
    k = weight.shape[-1]
    window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)
    out = (window.unfold(-1, k, 1) * weight[:, None]).sum(-1)
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out).transpose(1, 2)


SHORT_WINDOW = 16  # tokens after a cache's state up to which _conv_after_state runs


# ---------------------------------------------------------------------- experts
# torch._grouped_mm runs all experts' matmuls in one call; used where torch supports it (CPU float32,
# CUDA bf16 on Hopper or newer), elsewhere the per-expert loop. Both paths are tested against each other.
_grouped_mm = getattr(torch, "_grouped_mm", None)


def use_grouped_mm(x: torch.Tensor) -> bool:
    if _grouped_mm is None:
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def _group_bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


# torch.compile cannot trace the per-expert loop (its slice sizes are data) and traces
# ``torch._grouped_mm`` with a shape function that accepts bfloat16 only, although the CPU kernel
# runs float32. Compiled code therefore calls these two custom ops, opaque to the compiler, with
# their own shape functions and backward: torch's grouped matmul where it runs, else one matmul per
# group. Eager code calls the ATen op or the loop directly.
@torch.library.custom_op("kinetic::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (rows, in) grouped by the cumulative row ends ``offs`` (groups,) times b (groups, in, out)."""
    if use_grouped_mm(a):
        return _grouped_mm(a, b, offs=offs)
    out = a.new_zeros(a.shape[0], b.shape[-1])
    for g, (lo, hi) in enumerate(_group_bounds(offs)):
        if hi > lo:
            torch.mm(a[lo:hi], b[g], out=out[lo:hi])
    return out


@_grouped_mm_op.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("kinetic::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group g: a[rows of g].T @ grad[rows of g] -> (groups, in, out); zeros for an empty group."""
    if use_grouped_mm(a):
        return _grouped_mm(a.t(), grad, offs=offs)
    out = a.new_zeros(offs.shape[0], a.shape[1], grad.shape[1])
    for g, (lo, hi) in enumerate(_group_bounds(offs)):
        if hi > lo:
            torch.mm(a[lo:hi].t(), grad[lo:hi], out=out[g])
    return out


@_grouped_mm_weight_grad.register_fake
def _(a, grad, offs):
    return a.new_empty(offs.shape[0], a.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = _grouped_mm_op(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_weight_grad(a, grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)`` (or one matmul per group where torch has no grouped
    kernel for ``a``), through the custom op above where torch.compile traces anything but CUDA bf16."""
    if torch.compiler.is_compiling() and not (a.device.type == "cuda" and use_grouped_mm(a)):
        return _grouped_mm_op(a, b, offs)
    return _grouped_mm(a, b, offs=offs)


def combine_assignments(ys: torch.Tensor, order: torch.Tensor, k: int, atomic_free: bool) -> torch.Tensor:
    """Sum the expert outputs ``ys`` (tokens * k, width), sorted by expert as ``order`` sorted the
    flat (token, slot) assignments, back into their tokens -> (tokens, width). On CPU one index_add
    into the tokens (one pass); ``atomic_free`` unsorts and sums
    each token's k rows instead, which needs no atomic adds and so stays deterministic on GPUs."""
    tokens = ys.shape[0] // k
    if atomic_free:
        return ys.index_select(0, order.argsort()).view(tokens, k, -1).sum(1)
    return ys.new_zeros(tokens, ys.shape[-1]).index_add_(0, order // k, ys)



# Inference on at most this many (token, expert) assignments -- a decode or verification step --
# gathers the chosen experts' weights and runs two batched matmuls, instead of visiting every expert
# (asked before the C experts kernel: with its Python-side setup that kernel is no faster for a
# decode step in a whole model, benchmarks/decode.py, although benchmarks/ops.py times it faster).
GATHER_MAX = 32


def _no_host_sync(x: torch.Tensor) -> bool:
    """Inside torch.compile or a CUDA-graph capture, where values cannot be read back to the host."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def gather_experts(x, indices, weights, up, down):
    """Each assignment's expert weights gathered, two batched matmuls: no host synchronization (a
    CUDA graph can capture it), meant for the few tokens of a decode step."""
    tokens, k = indices.shape
    flat = indices.reshape(-1)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # (tokens * k, width, 1)
    # index_select copies whole expert matrices, faster than advanced indexing on CPU
    h = relu2(torch.bmm(up.index_select(0, flat), xs))
    ys = torch.bmm(down.index_select(0, flat), h).squeeze(-1)
    ys = ys.float() * weights.reshape(-1, 1)
    return ys.view(tokens, k, -1).sum(1).to(x.dtype)


def _gather_fits(x, indices, weights, up, down):
    return not torch.is_grad_enabled() and (indices.numel() <= GATHER_MAX or _no_host_sync(x))


def sort_by_expert(indices: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, slot) assignments of ``indices`` (tokens, k) sorted by expert, stably: order (the
    flat index ``token * k + slot`` of each sorted row), token_of (its token) and counts (rows per
    expert, (E,))."""
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=indices.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // indices.shape[1], counts


def sorted_experts(x, indices, weights, up, down):
    """The assignments sorted by expert, so each expert runs on one contiguous slice: through torch's
    grouped matmul where it runs (and in compiled code), else one matmul pair per expert."""
    k = indices.shape[1]
    order, token_of, counts = sort_by_expert(indices, up.shape[0])
    xs = x.index_select(0, token_of)  # (tokens * k, width), grouped by expert
    if use_grouped_mm(x) or torch.compiler.is_compiling():
        offsets = counts.cumsum(0).to(torch.int32)
        h = relu2(grouped_mm(xs, up.transpose(1, 2), offsets))
        ys = grouped_mm(h, down.transpose(1, 2), offsets)
    else:
        # unbind once: indexing a 3-D parameter per expert would make autograd build and sum one
        # full-size zero gradient per expert
        ups, downs, sizes = up.unbind(0), down.unbind(0), counts.tolist()
        outs = [F.linear(relu2(F.linear(chunk, ups[e])), downs[e])
                for e, chunk in enumerate(xs.split(sizes)) if sizes[e]]
        ys = torch.cat(outs) if outs else xs
    ys = ys.float() * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    return combine_assignments(ys, order, k, atomic_free=ys.device.type != "cpu").to(x.dtype)


# ---------------------------------------------------------------------- LM-head loss
class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        # hidden (N, d), weight (V, d), targets (N,)
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1).to(torch.float32)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        w32 = weight.float()
        w_t = w32.T.contiguous()  # (d, V): a plain row-major operand for the logits matmul
        rows = min(chunk_size, hidden.shape[0])
        if hidden.device.type == "cpu":  # the chunk buffer is tens of MiB: huge pages, few faults
            buf = cpu_kernels.empty_huge(rows, weight.shape[0])
        else:
            buf = hidden.new_empty((rows, weight.shape[0]), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].float()
            t = targets[start:start + chunk_size]
            ok = valid[start:start + chunk_size]
            logits = torch.mm(h, w_t, out=buf[: h.shape[0]])  # reused buffer: no page faults per chunk
            safe_t = t.clamp(min=0)
            picked = logits.gather(1, safe_t[:, None])[:, 0]
            # the log-sum-exp in place (logsumexp would write a chunk-sized temporary): logits
            # become exp(logits - max), then the softmax
            top = logits.amax(dim=-1, keepdim=True)
            sums = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            lse = (top + sums.log())[:, 0]
            total += ((lse - picked) * ok).sum()
            if needs_grad:  # d loss / d logits = (softmax - onehot) / count, rows of ignored tokens 0
                grad = logits.div_(sums)
                grad[torch.arange(grad.shape[0], device=grad.device), safe_t] -= 1.0
                grad.mul_((ok.to(grad.dtype) / count)[:, None])
                grad_h[start:start + chunk_size] = (grad @ w32).to(hidden.dtype)
                grad_w.addmm_(grad.T, h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None



LOSS_CHUNK = 1024  # tokens per chunk of logits


def chunked_cross_entropy(hidden, weight, targets, ignore_index=-100):
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                          ignore_index, LOSS_CHUNK)


IMPLEMENTATIONS = [
    Implementation("rms_norm", "torch.rms-norm-backward", _rms_norm_fn,
                   lambda x, weight, eps: x.device.type == "cpu" and needs_grad(x, weight)),
    Implementation("gated_rms_norm", "torch.gated-norm-backward", _gated_norm_fn,
                   lambda x, gate, weight, group_size, eps: needs_grad(x, gate, weight)),
    Implementation("relu_squared", "torch.relu2", relu2, always),
    Implementation("causal_conv1d_silu", "torch.channels-last", _conv_fn,  # its backward pays
                   lambda x, weight, bias, state=None: state is None and needs_grad(x, weight, bias)),
    Implementation("causal_conv1d_silu", "torch.unfold-after-state", _conv_after_state,
                   lambda x, weight, bias, state=None: state is not None and x.shape[1] <= SHORT_WINDOW),
    Implementation("ssd_chunk_scan", "torch.grouped", ssd.grouped_scan, always),
    Implementation("routed_experts", "torch.gather", gather_experts, _gather_fits, priority=10),
    Implementation("routed_experts", "torch.sorted", sorted_experts, always),
    Implementation("linear_cross_entropy", "torch.chunked", chunked_cross_entropy, always),
]
