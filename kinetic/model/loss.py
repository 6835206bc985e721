"""Fused LM-head + cross-entropy, computed in chunks of tokens.

The (tokens, vocab) logits tensor is the largest activation of a small-hidden, large-vocabulary
model. This Function never materializes it: for each chunk of tokens it forms the chunk's logits,
the loss, and right away the gradients w.r.t. the hidden states and the head weight (the loss is a
scalar, so backward only rescales them). Same idea as Liger-Kernel's fused linear cross-entropy.
Matches ``F.cross_entropy(h @ W.T, targets, ignore_index=...)`` (mean over non-ignored targets);
tested in tests/test_model.py.
"""

from __future__ import annotations

import torch

from kinetic.kernels.cpu import empty_huge

IGNORE_INDEX = -100


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
            buf = empty_huge(rows, weight.shape[0])
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


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` without building the logits.

    hidden (..., d), targets (...) with ``ignore_index`` marking tokens that do not count.
    """
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                          targets.reshape(-1), ignore_index, chunk_size)
