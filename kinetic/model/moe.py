"""NemotronH mixture of experts: sigmoid router with score-correction bias and group-limited
top-k, squared-ReLU experts, a shared expert, and the optional latent projections of latent MoE.

Tokens are dispatched by sorting their (token, expert) assignments by expert, so each expert runs
one matmul over a contiguous slice; the only Python loop is over experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinetic.config import ModelConfig
from kinetic.kernels import cpu as cpu_kernels
from kinetic.model.mlp import MLP, relu2

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


def count_per_expert(flat_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert. Unlike ``torch.bincount`` on CUDA this never reads the maximum back to
    the host, so it neither stalls the GPU nor breaks CUDA-graph capture."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_indices.device)
    return counts.scatter_add_(0, flat_indices, torch.ones_like(flat_indices))


def combine_assignments(ys: torch.Tensor, order: torch.Tensor, k: int, atomic_free: bool) -> torch.Tensor:
    """Sum the expert outputs ``ys`` (tokens * k, width), sorted by expert as ``order`` sorted the
    flat (token, slot) assignments, back into their tokens -> (tokens, width). On CPU one index_add
    into the tokens (one pass, MoE forward + backward 3-5% faster); ``atomic_free`` unsorts and sums
    each token's k rows instead, which needs no atomic adds and so stays deterministic on GPUs."""
    tokens = ys.shape[0] // k
    if atomic_free:
        return ys.index_select(0, order.argsort()).view(tokens, k, -1).sum(1)
    return ys.new_zeros(tokens, ys.shape[-1]).index_add_(0, order // k, ys)


class TopKRouter(nn.Module):
    """Sigmoid scores; ``e_score_correction_bias`` (the aux-loss-free balancing bias) only steers
    which experts are chosen, the combine weights come from the unbiased scores. On CPUs in float32
    the choice runs in C (``kinetic.kernels.cpu.route``), the same function except for exact ties
    (sigmoids saturated at 1.0 with equal biases): it takes the lower expert index, where torch's
    topk, and so transformers, leaves the pick unspecified."""

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
        if cpu_kernels.routing_fits(scores):  # the same choice in one C pass (kernels/experts.c)
            indices = cpu_kernels.route(scores, self.e_score_correction_bias.float(), self.n_group,
                                        self.topk_group, self.top_k)
        else:
            indices = self.choose(scores)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, weights * self.scaling, indices

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The experts each token routes to, (tokens, k), through torch's operators."""
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (tokens, n_group)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)
        return choice.topk(self.top_k, dim=-1).indices


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


# Inference on at most this many (token, expert) assignments -- a decode or verification step --
# gathers the chosen experts' weights and runs two batched matmuls, instead of visiting every expert
# (a grouped GEMM over mostly empty groups costs a call per expert on CPU).
GATHER_MAX = 32


class Experts(nn.Module):
    """All routed experts as two 3-D parameters (experts, out, in); on disk each expert is stored
    as its own 2-D ``experts.{e}.up_proj.weight`` / ``down_proj.weight`` (see kinetic.hf)."""

    def __init__(self, num_experts: int, width: int, intermediate: int) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, width))
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, intermediate))
        self.grouped = True  # set False to force the per-expert loop

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                static: bool = False) -> torch.Tensor:
        """x (tokens, width), indices/weights (tokens, k) -> (tokens, width). ``static`` gathers
        each assignment's expert weights instead of grouping tokens: no host synchronization, so a
        CUDA graph can capture it; meant for the few tokens of a decode step."""
        tokens, k = indices.shape
        flat = indices.reshape(-1)
        if static or (self.grouped and tokens * k <= GATHER_MAX and not torch.is_grad_enabled()):
            xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # (tokens * k, width, 1)
            # index_select copies whole expert matrices (6x faster than advanced indexing on CPU)
            h = relu2(torch.bmm(self.up_proj.index_select(0, flat), xs))
            ys = torch.bmm(self.down_proj.index_select(0, flat), h).squeeze(-1)
            ys = ys.float() * weights.reshape(-1, 1)
            return ys.view(tokens, k, -1).sum(1).to(x.dtype)
        if self.grouped and cpu_kernels.experts_fit(x, self.up_proj, self.down_proj):
            order, token_of, ends = cpu_kernels.dispatch(indices, self.up_proj.shape[0])
            w = weights.reshape(-1).index_select(0, order).float()  # sorted like the rows
            return _ExpertsC.apply(x, w, self.up_proj, self.down_proj, token_of, ends)
        order = flat.argsort(stable=True)
        counts = count_per_expert(flat, self.up_proj.shape[0])
        token_of = order // k  # the token of each expert-sorted assignment
        xs = x.index_select(0, token_of)  # (tokens * k, width), grouped by expert
        if self.grouped and (use_grouped_mm(x) or torch.compiler.is_compiling()):
            offsets = counts.cumsum(0).to(torch.int32)
            h = relu2(grouped_mm(xs, self.up_proj.transpose(1, 2), offsets))
            ys = grouped_mm(h, self.down_proj.transpose(1, 2), offsets)
        else:
            ys = self._loop(xs, counts.tolist())
        ys = ys.float() * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        return combine_assignments(ys, order, k, atomic_free=ys.device.type != "cpu").to(x.dtype)

    def _loop(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One matmul pair per expert over its contiguous slice (the portable reference path)."""
        # unbind once: indexing the 3-D parameter per expert would make autograd build and sum one
        # full-size zero gradient per expert
        ups, downs = self.up_proj.unbind(0), self.down_proj.unbind(0)
        outs = [F.linear(relu2(F.linear(chunk, ups[e])), downs[e])
                for e, chunk in enumerate(xs.split(counts)) if counts[e]]
        return torch.cat(outs) if outs else xs


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
        y = self.experts(x, indices, weights, static=getattr(cache, "static", False))
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
