"""kinetic.kernels.cpu: the C decode-attention kernel against a float64 reference and inside the model,
when it is used and when it is not, and how its build fails."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import kinetic.kernels.cpu as kc
import kinetic.model.attention as attention
from kinetic.config import preset
from kinetic.model import InferenceCache, NemotronHForCausalLM

AVX512 = "avx512f" in kc._cpu_flags()
needs_kernel = pytest.mark.skipif(not kc.decode_attention_available(),
                                  reason="the C decode-attention kernel needs x86-64 Linux with AVX-512 "
                                         "and a C compiler")


def reference(q, k, v):
    b, heads, _, d = q.shape
    kv = k.shape[1]
    scores = q.double().view(b, kv, heads // kv, d) @ k.double().transpose(-1, -2) / d**0.5
    return (scores.softmax(-1) @ v.double()).view(b, heads, 1, d)


@needs_kernel
@pytest.mark.parametrize("batch,heads,kv_heads,dim,keys", [
    (1, 4, 2, 16, 1),  # one key
    (1, 4, 2, 16, 15),  # under one 16-key group
    (1, 4, 2, 16, 64 * 5 + 17),  # whole blocks plus a ragged tail
    (2, 4, 2, 16, 3000),  # batch: heads of both sequences in one call
    (1, 8, 8, 16, 100),  # no grouping (one row per KV head)
    (1, 4, 1, 32, 5000),  # head size 32, all query heads on one KV head
    (3, 8, 2, 64, 2049),  # wider rows: the general accumulation path
])
def test_decode_attention_matches_float64(batch, heads, kv_heads, dim, keys):
    g = torch.Generator().manual_seed(keys)
    # a cache's filled part: a slice of a longer buffer, as the decode step passes it
    kbuf = torch.randn(batch, kv_heads, keys + 37, dim, generator=g)
    vbuf = torch.randn(batch, kv_heads, keys + 37, dim, generator=g)
    q = 3 * torch.randn(batch, heads, 1, dim, generator=g)  # peaked softmax: the running max matters
    k, v = kbuf[:, :, :keys], vbuf[:, :, :keys]
    assert kc.decode_attention_fits(q, k, v)
    out = kc.decode_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_decode_attention_parts_merge_over_a_long_cache():
    """Many partitions (keys // 1024 of them, threads permitting) merged by their log-sum-exp, with
    scores far apart so that most partitions' weight underflows."""
    g = torch.Generator().manual_seed(0)
    keys = 20_000
    k = torch.randn(1, 2, keys, 16, generator=g)
    v = torch.randn(1, 2, keys, 16, generator=g)
    q = torch.randn(1, 4, 1, 16, generator=g)
    out = kc.decode_attention(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=2e-6, rtol=1e-5)
    k[:, :, 12_345] = 10.0  # one key that dominates its head: the other parts' weights underflow
    q = torch.ones(1, 4, 1, 16)
    out = kc.decode_attention(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_decode_attention_fits_only_where_it_runs():
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    assert kc.decode_attention_fits(q, k, v) == kc.decode_attention_available()
    assert not kc.decode_attention_available("cpu", torch.float64)
    assert not kc.decode_attention_available("meta")
    with kc.torch_only():  # stepped aside for a comparison, then back
        assert not kc.decode_attention_fits(q, k, v)
    assert kc.decode_attention_fits(q, k, v) == kc.decode_attention_available()
    assert not kc.decode_attention_fits(q.double(), k.double(), v.double())  # float32 only
    assert not kc.decode_attention_fits(torch.randn(1, 4, 2, 16), k, v)  # two queries per head
    assert not kc.decode_attention_fits(torch.randn(1, 4, 1, 8), k[..., :8], v[..., :8])  # head size 8
    wide = torch.randn(1, 32, 1, 128)  # 16 rows of 128 per KV head: torch's GEMMs do better
    assert not kc.decode_attention_fits(wide, torch.randn(1, 2, 50, 128), torch.randn(1, 2, 50, 128))
    transposed = torch.randn(1, 2, 16, 50).transpose(-1, -2)  # keys not contiguous per position
    assert not kc.decode_attention_fits(q, transposed, v)
    assert not kc.decode_attention_fits(q.requires_grad_(), k, v)  # autograd needs torch's kernel


@needs_kernel
def test_cached_decode_uses_the_kernel_and_matches_torch(monkeypatch):
    """Decode steps of the tiny preset after a 700-token prompt: the kernel runs for the attention
    layer, and logits equal those with torch's attention."""
    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny")).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 700))
    calls = []
    kernel = kc.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a: calls.append(1) or kernel(*a))

    def decode(use_kernel: bool) -> list[torch.Tensor]:
        fits = kc.decode_attention_fits if use_kernel else (lambda *a: False)
        monkeypatch.setattr(attention, "decode_attention_fits", fits)
        cache = InferenceCache()
        cache.reserve(710)
        with torch.no_grad():
            logits = model(ids, cache, return_mtp=False, logits_to_keep=1).logits
            out = []
            for _ in range(6):
                logits = model(logits[:, -1:].argmax(-1), cache, return_mtp=False).logits
                out.append(logits)
        return out

    fast, slow = decode(True), decode(False)
    attention_layers = model.config.hybrid_override_pattern.count("*")
    assert len(calls) == 6 * attention_layers
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not AVX512, reason="the kernel is only built on CPUs with AVX-512")
def test_a_failed_build_warns_once_and_leaves_torchs_attention(monkeypatch, tmp_path):
    monkeypatch.setenv("KINETIC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    kc._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="decode-attention kernel is unavailable"):
            assert not kc.decode_attention_available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the failure is remembered: no second warning
            assert not kc.decode_attention_available()
        q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
        assert not kc.decode_attention_fits(q, k, v)
        out = attention._sdpa(q, k, v, None, False)  # the decode attention still works, through torch
        torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-6, rtol=1e-5)
    finally:
        kc._library.cache_clear()


def test_the_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("KINETIC_CPU_KERNELS", "0")
    kc._library.cache_clear()
    try:
        assert not kc.decode_attention_available()
    finally:
        kc._library.cache_clear()


@needs_kernel
def test_a_build_is_reused(monkeypatch, tmp_path):
    """The library is built once per source, compiler and CPU; later calls find it."""
    monkeypatch.setenv("KINETIC_KERNEL_CACHE", str(tmp_path))
    first = kc.build(kc._SOURCE)
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.suffix == ".so"
    assert kc.build(kc._SOURCE) == first and first.stat().st_mtime_ns == stamp
    assert os.listdir(tmp_path) == [first.name]  # no temporary files left behind
    with pytest.raises(RuntimeError, match="failed on decode_attention.c"):
        kc.build(kc._SOURCE, compiler="false")
