"""The fixed-address decode path that CUDA graphs capture, checked eagerly on CPU: StaticCache
decoding (in-place Mamba states, full-capacity masked attention, sync-free gathered MoE dispatch)
gives the logits of ordinary InferenceCache decoding for every layer type; misuse is refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import CONFIGS, make_config, randomize

from kinetic import NemotronHForCausalLM
from kinetic.infer.cache import InferenceCache
from kinetic.infer.static_cache import CompiledDecoder, CUDAGraphDecoder, StaticCache
from kinetic.model.moe import count_per_expert


@pytest.fixture(params=[False, True], ids=["sdpa", "split-kv"])
def split_kv(request, monkeypatch):
    """Both attention paths of a static step: SDPA with the full-capacity mask (CPU, short CUDA
    caches), and the split-KV one ("sdpa.static-split-kv") that CUDA takes from 8K of capacity,
    forced here with 3 partitions (plus a remainder at capacity 32) so that positions cross
    partitions during the test. Yields the number of static split-KV attention calls so far."""
    from kinetic.kernels import sdpa

    calls = []
    real = sdpa._static_split_kv_attention
    monkeypatch.setattr(sdpa, "_static_split_kv_attention", lambda *args: calls.append(1) or real(*args))
    if request.param:
        monkeypatch.setattr(sdpa, "_static_split_kv", lambda q, capacity: True)
        monkeypatch.setattr(sdpa, "_split_kv_partitions", lambda q, kv_heads, length: 3)
    yield request.param
    assert bool(calls) == request.param  # the static steps took the path under test


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_static_cache_decoding_equals_dynamic(name, one_thread, split_kv):
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(make_config(name)), seed=1, dt_bias=0.5).eval()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(model.config.vocab_size, (2, 9), generator=g)
    steps = torch.randint(model.config.vocab_size, (2, 6), generator=g)
    ref_cache, cache = InferenceCache(), InferenceCache()
    model(prompt, ref_cache, return_mtp=False)
    cache.reserve(20)
    model(prompt, cache, return_mtp=False)
    static = StaticCache(cache, capacity=20)
    assert static.length == 9
    for t in range(steps.shape[1]):
        want = model(steps[:, t:t + 1], ref_cache, return_mtp=False).logits
        got = model(steps[:, t:t + 1], static, return_mtp=False).logits
        static.advance()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert static.length == 15


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_static_tracked_forward_and_keep_equal_dynamic(name, one_thread, split_kv):
    """The fixed-address version of speculative verification: a tracked forward of several tokens
    and ``keep(n)`` (n as an int or a device tensor) leave the same state as InferenceCache's, so
    the logits of that forward and of the steps after it agree."""
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(make_config(name)), seed=3, dt_bias=0.5).eval()
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(model.config.vocab_size, (1, 7), generator=g)
    ref, cache = InferenceCache(), InferenceCache()
    model(prompt, ref, return_mtp=False)
    cache.reserve(32)
    model(prompt, cache, return_mtp=False)
    static = StaticCache(cache, capacity=32, track=4)
    for n, as_tensor in ((2, False), (4, True), (1, False), (3, True)):
        block = torch.randint(model.config.vocab_size, (1, 4), generator=g)
        with ref.tracking():
            want = model(block, ref, return_mtp=False).logits
        with static.tracking():
            got = model(block, static, return_mtp=False).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        ref.keep(n)
        static.keep(torch.tensor([n]) if as_tensor else n)
        step = torch.randint(model.config.vocab_size, (1, 1), generator=g)
        want = model(step, ref, return_mtp=False).logits
        got = model(step, static, return_mtp=False).logits
        static.advance()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert static.length == 7 + 10 + 4
    with pytest.raises(ValueError, match="track"), static.tracking():
        model(torch.zeros(1, 5, dtype=torch.long), static, return_mtp=False)


def test_bucket_capacity_shares_shapes_and_bounds_padding():
    from kinetic.infer.static_cache import bucket_capacity

    assert [bucket_capacity(n) for n in (0, 1, 256, 257, 5000, 8192)] == [256, 256, 256, 512, 8192, 8192]
    assert bucket_capacity(8193) == 10240 and bucket_capacity(131_072) == 131_072
    assert bucket_capacity(131_073) == 163_840
    sizes = range(8193, 300_000, 997)
    caps = [bucket_capacity(n) for n in sizes]
    assert all(n <= c <= 1.25 * n for n, c in zip(sizes, caps, strict=True))
    assert caps == sorted(caps)
    assert len({bucket_capacity(n) for n in range(131_073, 262_145, 512)}) == 4  # per doubling


def test_count_per_expert_matches_bincount():
    flat = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(count_per_expert(flat, 9), torch.bincount(flat, minlength=9))


@torch.no_grad()
def test_static_cache_refuses_misuse():
    torch.manual_seed(0)
    model = NemotronHForCausalLM(make_config("latent-grouped-mtp")).eval()
    cache = InferenceCache()
    model(torch.zeros(1, 5, dtype=torch.long), cache, return_mtp=False)
    with pytest.raises(ValueError, match="capacity"):
        StaticCache(cache, capacity=5)
    static = StaticCache(cache, capacity=8)
    with pytest.raises(ValueError, match="one token"):
        model(torch.zeros(1, 2, dtype=torch.long), static, return_mtp=False)
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphDecoder(model, static)
    # generate() asked for graphs on CPU warns and decodes eagerly, with the same tokens
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    with pytest.warns(UserWarning, match="CUDA graph"):
        out = model.generate(ids, max_new_tokens=5, eos_token_id=None, cuda_graph=True)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, eos_token_id=None))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
@torch.no_grad()
def test_compiled_decode_equals_eager_and_is_reused(one_thread):
    """torch.compile of the fixed-shape step (the CPU fast path): the same logits as eager decoding,
    also when a later cache of the same capacity reuses the compiled step; generate(compile=True)
    gives the eager tokens. (Compiled kernels may round differently in the last bits, so the token
    check is on a model and prompt without near-ties; the logits check is the general one.)"""
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(make_config("latent-grouped-mtp")), seed=3, dt_bias=0.5).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=g)
    eager = model.generate(ids, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(model.generate(ids, max_new_tokens=20, eos_token_id=None, compile=True), eager)
    compiled = model.__dict__["_compiled_decode_step"]
    for prompt_len in (17, 30):  # new caches of the same capacity bucket
        prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=g)
        cache, ref = InferenceCache(), InferenceCache()
        cache.reserve(256)
        token = model(prompt, cache, return_mtp=False).logits[:, -1:].argmax(-1)
        model(prompt, ref, return_mtp=False)
        decoder = CompiledDecoder(model, StaticCache(cache, 256))
        for _ in range(8):
            got = decoder.step(token)
            want = model(token, ref, return_mtp=False).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            token = want.argmax(-1, keepdim=True)
    assert model.__dict__["_compiled_decode_step"] is compiled
