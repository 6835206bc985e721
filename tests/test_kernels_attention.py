"""The causal-attention kernel (kinetic/kernels/attention.c, the "cpu.c" implementation of
causal_attention in kinetic.kernels.cpu_ops): forward and backward against
scaled_dot_product_attention in float64, its use by the model, and where it steps aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kinetic.kernels.cpu as kc
import kinetic.model.attention as attention
from kinetic import ops
from kinetic.config import preset
from kinetic.kernels import cpu_ops

needs_attention = pytest.mark.skipif(not kc.attention_kernel_available(),
                                     reason="the attention kernel needs x86-64 Linux, a C compiler and a "
                                            "torch that exports sgemm_")


def reference(q, k, v, scale):
    """Causal attention of q (b, l, heads, d) over k, v (b, l, kv_heads, d) through SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def with_grads(fn, q, k, v, grad, dtype):
    leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    (out * grad.to(dtype)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@needs_attention
@pytest.mark.parametrize("b,seqlen,heads,kv_heads,dim,spread", [
    (2, 200, 8, 2, 32, 1.0),  # the small preset's heads; a partial last block of queries
    (1, 64, 2, 1, 16, 1.0),  # exactly one block; every query head on one KV head
    (2, 130, 6, 6, 48, 1.0),  # no grouping; a head size that is not a power of two
    (1, 1, 4, 2, 8, 1.0),  # a single position
    (1, 96, 4, 2, 16, 12.0),  # large scores: nearly one-hot softmax rows
])
def test_attention_kernel_matches_float64(count_calls, b, seqlen, heads, kv_heads, dim, spread):
    calls = count_calls(kc, "attention_forward")
    g = torch.Generator().manual_seed(seqlen)
    q = torch.randn(b, seqlen, heads, dim, generator=g) * spread
    k, v = torch.randn(2, b, seqlen, kv_heads, dim, generator=g)
    grad = torch.randn(b, seqlen, heads, dim, generator=g)
    scale = dim ** -0.5

    def kernel(q_, k_, v_):
        return cpu_ops._CausalAttentionC.apply(q_, k_, v_, scale)

    got = with_grads(kernel, q, k, v, grad, torch.float32)
    assert len(calls) == 1
    want = with_grads(lambda *t: reference(*t, scale), q, k, v, grad, torch.float64)
    # the tolerance scales with the gradients' size: where one is zero in exact arithmetic (dq and dk
    # of a single position: the softmax over one key is constant), float32 leaves the rounding of the
    # terms that cancel, about 1e-7 of the others (4e-7 against 2.5 on an Intel Xeon)
    size = max(r.abs().max().item() for r in want)
    for name, a, r in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        torch.testing.assert_close(a.double(), r, atol=2e-5 * size, rtol=1e-5, msg=name)
    with torch.no_grad():  # inference keeps no log-sum-exp: the same output
        torch.testing.assert_close(kernel(q, k, v), got[0], atol=0, rtol=0)


@needs_attention
def test_model_attention_uses_the_kernel_without_a_cache(count_calls):
    """A whole-sequence forward + backward of an attention layer runs the kernel and matches SDPA;
    with an inference cache (prefill, decode) the layer keeps SDPA."""
    calls = count_calls(kc, "attention_forward")
    torch.manual_seed(0)
    layer = attention.Attention(preset("small"))
    x = torch.randn(2, 70, layer.q_proj.in_features)
    q = torch.randn(2, 70, layer.num_heads, layer.head_dim, requires_grad=True)
    kv = torch.randn(2, 70, layer.num_kv_heads, layer.head_dim)
    assert ops.chosen("causal_attention", q, kv, kv) == "cpu.c"

    def run():
        layer.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        out = layer(xs)
        out.square().sum().backward()
        return out.detach(), xs.grad, layer.q_proj.weight.grad, layer.v_proj.weight.grad

    got = run()
    assert len(calls) == 1
    with kc.torch_only():
        want = run()
    assert len(calls) == 1
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, atol=1e-5 * r.abs().max().item(), rtol=1e-5)


def test_attention_kernel_fits_only_where_it_runs():
    q, k = torch.randn(1, 10, 4, 16), torch.randn(1, 10, 2, 16)
    assert kc.attention_fits(q, k, k) == kc.attention_kernel_available()
    assert not kc.attention_kernel_available("cpu", torch.float64)
    assert not kc.attention_kernel_available("meta")
    assert not kc.attention_fits(q.double(), k.double(), k.double())
    assert not kc.attention_fits(q, torch.randn(1, 10, 3, 16), torch.randn(1, 10, 3, 16))  # 4 heads over 3
    assert not kc.attention_fits(q, k[:, :5], k[:, :5])  # fewer keys than queries (a cache)
    long = torch.randn(1, kc.ATTENTION_MAX_LEN + 1, 1, 8)
    assert not kc.attention_fits(long, long, long)
    with kc.torch_only():
        assert not kc.attention_fits(q, k, k)


def test_without_a_blas_attention_runs_through_sdpa(without_blas, count_calls):
    calls = count_calls(kc, "attention_forward")
    assert not kc.attention_kernel_available()
    torch.manual_seed(1)
    layer = attention.Attention(preset("tiny"))
    x = torch.randn(1, 20, layer.q_proj.in_features)
    layer(x).sum().backward()
    assert not calls


@pytest.mark.skipif(not kc._linux_x86() or kc._blas() is None,
                    reason="the attention kernel is only built on x86-64 Linux, with torch's sgemm_")
def test_a_failed_attention_kernel_build_warns_once(failed_build, count_calls):
    calls = count_calls(kc, "attention_forward")
    with failed_build(kc._attention_library, "causal-attention kernel is unavailable",
                      kc.attention_kernel_available):
        layer = attention.Attention(preset("tiny"))
        layer(torch.randn(1, 12, layer.q_proj.in_features)).sum().backward()  # through SDPA
        assert not calls


def test_the_attention_kernel_can_be_turned_off(kernels_off):
    assert not kc.attention_kernel_available()
