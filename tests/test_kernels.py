"""kinetic.kernels.cpu: the C decode-attention, Mamba-2 scan, causal-conv and norm kernels against
float64 references (through their implementations in kinetic.kernels.cpu_ops) and inside the model,
when they are used and when they are not, and how their builds fail (tests/test_ops.py compares every
implementation with its operation's reference on random float32 inputs; these add float64
references, strided inputs and destinations, extreme values and narrower SIMD builds)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

import kinetic.kernels.cpu as kc
import kinetic.model.mamba2 as mamba2
from kinetic import ops
from kinetic.config import preset
from kinetic.infer.cache import InferenceCache
from kinetic.kernels import cpu_ops, ssd
from kinetic.kernels.shared_grad import split_shared
from kinetic.model import NemotronHForCausalLM

AVX512 = "avx512f" in kc._cpu_flags()


def implementation(op: str, name: str):
    """The registered implementation ``name`` of operation ``op`` (its ``fn`` runs it whatever fits)."""
    return next(i for i in ops.implementations(op) if i.name == name)

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
    (1, 8, 2, 16, 1003),  # 4 rows per KV head: four accumulators per row, keys not a multiple of 4
    (1, 12, 2, 16, 777),  # 6 rows per KV head: one accumulator per row
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
def test_cached_decode_uses_the_kernel_and_matches_torch(monkeypatch, count_calls):
    """Decode steps of the tiny preset after a 700-token prompt: the kernel runs for the attention
    layer, and logits equal those with torch's attention."""
    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny")).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 700))
    c = model.config
    q = torch.randn(1, c.num_attention_heads, 1, c.head_dim)
    kv = torch.randn(1, c.num_key_value_heads, 701, c.head_dim)
    with torch.no_grad():
        assert ops.chosen("cached_attention", q, kv, kv, 700) == "cpu.c-decode"
    calls = count_calls(kc, "decode_attention")
    fits = kc.decode_attention_fits

    def decode(use_kernel: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(kc, "decode_attention_fits", fits if use_kernel else (lambda *a: False))
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
def test_a_failed_build_warns_once_and_leaves_torchs_attention(failed_build):
    with failed_build(kc._library, "decode-attention kernel is unavailable", kc.decode_attention_available):
        q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
        assert not kc.decode_attention_fits(q, k, v)
        assert ops.chosen("cached_attention", q, k, v, 39) != "cpu.c-decode"
        out = ops.cached_attention(q, k, v, 39)  # the decode attention still works, through torch
        torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-6, rtol=1e-5)


def test_the_kernels_can_be_turned_off(kernels_off):
    assert not kc.decode_attention_available()
    assert not kc.mamba_kernels_available()
    x, C = torch.randn(1, 2, 4, 3, 64, 32), torch.randn(1, 2, 3, 64, 64)
    assert not kc.ssd_chunk_fits(x, C)


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


# --- the Mamba-2 scan's chunk kernel (mamba.c) ------------------------------------------------------

needs_ssd = pytest.mark.skipif(not kc.mamba_kernels_available(),
                               reason="the C scan kernel needs x86-64 Linux and a C compiler")


def scan_inputs(b, seqlen, heads, p, groups, n, init, dt_scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seqlen, heads, p, generator=g)
    dt = torch.rand(b, seqlen, heads, generator=g) * dt_scale
    A = -(torch.rand(heads, generator=g) * 4 + 0.1)
    B = torch.randn(b, seqlen, groups, n, generator=g)
    C = torch.randn(b, seqlen, groups, n, generator=g)
    s0 = torch.randn(b, heads, p, n, generator=g) if init else None
    return x, dt, A, B, C, s0


def scan_with_grads(inputs, chunk, dtype, skip=True, scan=mamba2.ssd_chunk_scan):
    """``scan``'s outputs (default: the operation, which takes the C kernel where it fits) and the
    gradients of a random projection of them w.r.t. every input (with ``skip``, the D skip weights
    too)."""
    x, dt, A, B, C, s0 = inputs
    D = torch.linspace(-1.5, 2.0, x.shape[2])
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, dt, B, C, D)[:4 + skip]]
    s = s0.detach().to(dtype).clone().requires_grad_() if s0 is not None else None
    y, final = scan(leaves[0], leaves[1], A.to(dtype), leaves[2], leaves[3], chunk, s,
                    leaves[4] if skip else None)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g).to(dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g).to(dtype)).sum()
    loss.backward()
    return [y, final] + [t.grad for t in leaves] + ([s.grad] if s is not None else [])


@pytest.fixture
def scan_calls(count_calls):
    """Counts the kernel's forward calls."""
    return count_calls(kc, "ssd_chunk_forward")


@needs_ssd
@pytest.mark.parametrize("b,seqlen,heads,p,groups,n,chunk,init", [
    (2, 200, 8, 32, 2, 64, 64, False),  # the small preset's shapes; a padded last chunk
    (1, 37, 4, 16, 1, 16, 64, True),  # shorter than a chunk (one chunk of 37), an initial state
    (1, 300, 8, 64, 2, 128, 128, True),  # Nano's head, state and chunk sizes
    (3, 64, 2, 16, 2, 32, 16, False),  # one head per group, small chunks
    (1, 5, 4, 16, 4, 16, 64, True),  # a handful of tokens
    (1, 40, 6, 48, 3, 48, 8, False),  # head and state sizes 48: three vectors, one pair split
])
def test_scan_kernel_matches_float64(scan_calls, b, seqlen, heads, p, groups, n, chunk, init):
    """The kernels' (chunk states and chunk outputs) outputs, final state and the gradients w.r.t. x,
    dt, B, C, the skip weights D and the initial state against torch's composition of the same scan
    in float64 (the operation's reference)."""
    inputs = scan_inputs(b, seqlen, heads, p, groups, n, init, seed=seqlen)
    got = scan_with_grads(inputs, chunk, torch.float32, scan=implementation("ssd_chunk_scan", "cpu.c").fn)
    assert len(scan_calls) == 1
    want = scan_with_grads(inputs, chunk, torch.float64, scan=mamba2.ssd_chunk_scan.reference)
    assert len(scan_calls) == 1  # float64 stays with torch
    names = ["y", "final", "dx", "ddt", "dB", "dC", "dD", "dinitial"]
    assert len(got) == len(want) == 7 + init
    for name, a, r in zip(names[:len(got)], got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        torch.testing.assert_close(a.double(), r, atol=2e-5 * r.abs().max().item(), rtol=1e-5, msg=name)


@needs_ssd
def test_scan_kernel_on_fully_decayed_heads(scan_calls):
    """Heads whose log-decays pass MIN_LOG_DECAY within a chunk (and whose incoming state has
    decayed away): the kernel clamps as torch's path does, with finite gradients."""
    inputs = scan_inputs(2, 130, 4, 16, 2, 16, True, dt_scale=8.0, seed=3)
    got = scan_with_grads(inputs, 64, torch.float32)
    with kc.torch_only():
        assert ops.chosen("ssd_chunk_scan", *inputs[:5], 64) == "torch.grouped"
        want = scan_with_grads(inputs, 64, torch.float32)
    assert len(scan_calls) == 1
    for a, r in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, atol=1e-5 * r.abs().max().item(), rtol=1e-5)


def test_scan_kernel_fits_only_where_it_runs():
    x = torch.randn(1, 2, 4, 3, 64, 32)  # (b, g, r, c, L, p)
    C = torch.randn(1, 2, 3, 64, 64)  # (b, g, c, L, n)
    assert kc.ssd_chunk_fits(x, C) == kc.mamba_kernels_available()
    assert not kc.mamba_kernels_available("cpu", torch.float64) and not kc.mamba_kernels_available("meta")
    assert not kc.ssd_chunk_fits(x.double(), C.double())
    assert not kc.ssd_chunk_fits(x[..., :8], C)  # head size 8: not whole vectors
    assert not kc.ssd_chunk_fits(x, C[..., :24])  # state size 24
    assert not kc.ssd_chunk_fits(torch.randn(1, 1, 1, 1, 512, 16), torch.randn(1, 1, 1, 512, 16))  # chunk 512
    with kc.torch_only():
        assert not kc.ssd_chunk_fits(x, C)


@needs_ssd
def test_scan_kernel_names_a_mismatched_shape():
    x, a = torch.randn(1, 2, 4, 3, 64, 32), torch.randn(1, 2, 4, 3, 64)
    C, S = torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 4, 3, 32, 64)
    cb, D = torch.randn(1, 2, 3, 64, 64), torch.randn(8)
    m = ssd.MIN_LOG_DECAY
    wrong = r"S has shape \(1, 2, 4, 3, 64, 32\), expected \(1, 2, 4, 3, 32, 64\)"
    with pytest.raises(ValueError, match=wrong):
        kc.ssd_chunk_forward(cb, a, x, a, C, S.transpose(-1, -2), D, m)
    with pytest.raises(ValueError, match=r"D has shape \(4,\), expected \(8,\)"):
        kc.ssd_chunk_forward(cb, a, x, a, C, S, D[:4], m)
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor"):
        kc.ssd_chunk_forward(cb, a, x.double(), a, C, S, None, m)
    with pytest.raises(ValueError, match=r"dt \(1, 2, 4, 3, 32\) and B \(1, 2, 3, 64, 64\) do not fit"):
        kc.ssd_states_forward(a, x, a[..., :32], C, m)


@needs_ssd
def test_model_training_step_with_the_mamba_kernels_matches_torch(scan_calls, monkeypatch):
    """A forward + backward of the tiny preset (MTP included): loss and every parameter's gradient
    equal those of torch's scan and conv, and the scan kernel ran once per Mamba layer. The kernels
    wrote their gradients straight into the in_proj and chunk-carry splits' buffers (the in_proj
    split by the "cpu.shared-gradient" implementation of split_channels, the carry's in
    kinetic.kernels.ssd): only dt's gradient (from torch's softplus) was copied, and the unused final
    state's zero-filled."""
    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 70))
    splits = []

    def recorded_split(*args, **kwargs):
        parts, shared = split_shared(*args, **kwargs)
        splits.append(shared)
        return parts, shared

    monkeypatch.setattr(cpu_ops, "split_shared", recorded_split)
    monkeypatch.setattr(ssd, "split_shared", recorded_split)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    config = model.config
    mamba_layers = (config.hybrid_override_pattern + config.mtp_hybrid_override_pattern).count("M")
    assert len(scan_calls) == mamba_layers > 0
    assert len(splits) == 2 * mamba_layers  # in_proj's, then the carry's, per layer
    assert [s.copied for s in splits] == [[2], [1]] * mamba_layers
    with kc.torch_only():
        ref_loss, ref_grads = step()
    assert len(scan_calls) == mamba_layers
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.skipif(not kc._linux_x86(), reason="the scan kernel is only built on x86-64 Linux")
def test_a_failed_scan_kernel_build_warns_once_and_leaves_torchs_scan(failed_build, scan_calls):
    with failed_build(kc._mamba_library, "Mamba-2 kernel is unavailable", kc.mamba_kernels_available):
        inputs = scan_inputs(1, 70, 4, 16, 2, 16, False)
        got = scan_with_grads(inputs, 32, torch.float32)  # torch's scan, still right
        want = scan_with_grads(inputs, 32, torch.float64)
        assert not scan_calls
        torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-5)


@needs_ssd
@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # AVX2 (8-float vectors), SSE2 (4-float)
def test_scan_kernel_at_narrower_simd_widths(monkeypatch, tmp_path, scan_calls, march):
    """The kernel's vectors follow the target's SIMD width; this machine runs the AVX-512 build, so
    the AVX2 and SSE2 builds (``KINETIC_KERNEL_MARCH``) are checked here against float64 too."""
    monkeypatch.setenv("KINETIC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("KINETIC_KERNEL_MARCH", march)
    kc._mamba_library.cache_clear()
    try:
        inputs = scan_inputs(2, 100, 6, 48, 3, 32, True, seed=7)
        got = scan_with_grads(inputs, 32, torch.float32)
        assert len(scan_calls) == 1 and len(list(tmp_path.glob("mamba-*.so"))) == 1
        want = scan_with_grads(inputs, 32, torch.float64, scan=mamba2.ssd_chunk_scan.reference)
        for a, r in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), r, atol=2e-5 * r.abs().max().item(), rtol=1e-5)
    finally:
        kc._mamba_library.cache_clear()


def test_the_kernel_march_comes_from_the_environment(monkeypatch, tmp_path):
    """``KINETIC_KERNEL_MARCH`` replaces ``-march=native`` in the compiler's command and in the build
    key, so a build for another target is a library of its own (built, not reused)."""
    assert "-march=native" in kc.compiler_flags()
    monkeypatch.setenv("KINETIC_KERNEL_MARCH", "x86-64")
    flags = kc.compiler_flags()
    assert "-march=x86-64" in flags and "-march=native" not in flags
    others = [f for f in kc.FLAGS if not f.startswith("-march=")]
    assert [f for f in flags if not f.startswith("-march=")] == others
    monkeypatch.setenv("KINETIC_KERNEL_CACHE", str(tmp_path))
    commands = []

    def compiler(command, **kwargs):  # records the command and "builds" an empty library
        commands.append(command)
        open(command[command.index("-o") + 1], "wb").close()
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(kc.subprocess, "run", compiler)
    generic = kc.build(kc._SOURCE, compiler="cc")
    assert "-march=x86-64" in commands[-1] and "-march=native" not in commands[-1]
    monkeypatch.delenv("KINETIC_KERNEL_MARCH")
    native = kc.build(kc._SOURCE, compiler="cc")
    assert "-march=native" in commands[-1] and native != generic and len(commands) == 2


# --- the causal conv + SiLU (mamba.c) -------------------------------------------------------------------

def conv_reference(x, weight, bias):
    """silu(causal depthwise conv) through F.conv1d, channels first; weight (c, k)."""
    c, k = x.shape[-1], weight.shape[-1]
    out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=k - 1, groups=c)[..., : x.shape[1]]
    return F.silu(out).transpose(1, 2)


@needs_ssd
@pytest.mark.parametrize("b,seqlen,channels,taps,bias,scale", [
    (2, 70, 96, 4, True, 1.0),  # Mamba's 4 taps, several blocks of steps
    (1, 3, 40, 4, False, 1.0),  # fewer steps than taps, no bias
    (3, 33, 17, 2, True, 4.0),  # odd channel count, large pre-activations (SiLU's tails)
    (1, 1, 8, 4, True, 1.0),  # one step
    (2, 100, 64, 8, True, 1.0),  # the most taps the kernel takes
])
def test_conv_kernel_matches_float64(count_calls, b, seqlen, channels, taps, bias, scale):
    """Output and the gradients w.r.t. x (a strided slice, as the input projection's output is),
    the weight and the bias against F.conv1d in float64."""
    calls = count_calls(kc, "conv_silu_forward")
    g = torch.Generator().manual_seed(seqlen)
    wide = torch.randn(b, seqlen, channels + 10, generator=g) * scale
    x = wide[..., 5:5 + channels]
    weight = torch.randn(channels, taps, generator=g)
    bias_t = torch.randn(channels, generator=g) if bias else None
    grad = torch.randn(b, seqlen, channels, generator=g)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() if t is not None else None
                  for t in (x, weight, bias_t)]
        y = fn(*leaves)
        (y * grad.to(dtype)).sum().backward()
        return [y] + [t.grad for t in leaves if t is not None]

    kernel = implementation("causal_conv1d_silu", "cpu.c")
    assert kernel.fits(x, weight, bias_t)
    got = run(kernel.fn, torch.float32)
    assert len(calls) == 1
    want = run(conv_reference, torch.float64)
    for a, r in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape
        torch.testing.assert_close(a.double(), r, atol=2e-6 * r.abs().max().item(), rtol=1e-5)


def test_conv_kernel_fits_only_where_it_runs():
    x, w = torch.randn(2, 10, 32), torch.randn(32, 4)
    assert kc.conv_silu_fits(x, w) == kc.mamba_kernels_available()
    assert not kc.conv_silu_fits(x.double(), w.double())
    assert not kc.conv_silu_fits(x.transpose(1, 2).contiguous().transpose(1, 2), w)  # channels strided
    assert not kc.conv_silu_fits(x[..., :9], torch.randn(9, 9))  # 9 taps
    with kc.torch_only():
        assert not kc.conv_silu_fits(x, w)


@needs_ssd
def test_conv_kernel_names_a_mismatched_weight():
    with pytest.raises(ValueError, match=r"weight \(16, 4\) / bias None do not fit x of 32 channels"):
        kc.conv_silu_forward(torch.randn(1, 5, 32), torch.randn(16, 4), None)


@needs_ssd
def test_backward_kernels_write_into_strided_destinations():
    """The conv's x gradient, the gated norm's gate gradient and the chunk kernel's state gradient,
    each written into a slice of a larger NaN-filled buffer (as kinetic.model.shared_grad asks):
    equal to the kernel's own output, nothing outside the slice touched; a misfit is named."""
    g = torch.Generator().manual_seed(3)
    x, grad = torch.randn(2, 9, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    w = torch.randn(32, 4, generator=g)
    buffer = torch.full((2, 9, 50), float("nan"))
    gx, gw, gb = kc.conv_silu_backward(x, w, None, grad)
    got = kc.conv_silu_backward(x, w, None, grad, buffer[..., 10:42])
    assert got[0].data_ptr() == buffer[..., 10:42].data_ptr() and gb is None
    torch.testing.assert_close(buffer[..., 10:42], gx, rtol=0, atol=0)
    torch.testing.assert_close(got[1], gw, rtol=0, atol=0)
    assert buffer[..., :10].isnan().all() and buffer[..., 42:].isnan().all()
    with pytest.raises(ValueError, match=r"gx: got \(2, 9, 31\).*expected a float32 CPU tensor of shape "
                       r"\(2, 9, 32\) with contiguous channels"):
        kc.conv_silu_backward(x, w, None, grad, buffer[..., :31])
    with pytest.raises(ValueError, match="gx: .*strides"):
        kc.conv_silu_backward(x, w, None, grad, buffer.transpose(1, 2)[..., :9, :].transpose(1, 2)[:, :, :32])

    gate, weight = torch.randn(2, 9, 32, generator=g), torch.randn(32, generator=g)
    _, rstd = kc.gated_norm_forward(x, gate, weight, 16, 1e-5, keep=True)
    dx, dgate, dweight = kc.gated_norm_backward(x, gate, weight, rstd, grad, 16)
    buffer = torch.full((2, 9, 50), float("nan"))
    got = kc.gated_norm_backward(x, gate, weight, rstd, grad, 16, buffer[..., 5:37])
    for a, r in zip(got, (dx, dgate, dweight), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    assert buffer[..., :5].isnan().all() and buffer[..., 37:].isnan().all()
    with pytest.raises(ValueError, match="dgate: got"):
        kc.gated_norm_backward(x, gate, weight, rstd, grad, 16, buffer[:1, :, 5:37])

    b, c, L, gr, r, p, n = 1, 2, 64, 2, 2, 32, 64
    cb = torch.randn(b, gr, c, L, L, generator=g)
    a_cs = torch.randn(b, gr, r, c, L, generator=g).clamp(max=0)
    xh = torch.randn(b, gr, r, c, L, p, generator=g)
    dth = torch.rand(b, gr, r, c, L, generator=g)
    Ch = torch.randn(b, gr, c, L, n, generator=g)
    S = torch.randn(b, gr, r, c, p, n, generator=g)
    dy = torch.randn(b, gr, r, c, L, p, generator=g)
    m = ssd.MIN_LOG_DECAY
    want = kc.ssd_chunk_backward(cb, a_cs, xh, dth, Ch, S, None, dy, m)
    buffer = torch.full((b, gr, r, c + 1, p, n), float("nan"))
    got = kc.ssd_chunk_backward(cb, a_cs, xh, dth, Ch, S, None, dy, m, buffer[:, :, :, :c])
    assert got[5].data_ptr() == buffer.data_ptr() and buffer[:, :, :, c].isnan().all()
    for a, r_ in zip(got, want, strict=True):
        if r_ is not None:
            torch.testing.assert_close(a, r_, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"d_S \(1, 2, 2, 2, 64, 32\)"):
        kc.ssd_chunk_backward(cb, a_cs, xh, dth, Ch, S, None, dy, m, buffer[:, :, :, :c].transpose(-1, -2))


# --- the gated RMSNorm (mamba.c) ---------------------------------------------------------------------

@needs_ssd
@pytest.mark.parametrize("b,seqlen,width,group,scale", [
    (4, 64, 512, 256, 1.0),  # the small preset's mixer: two groups of 256
    (1, 5, 24, 8, 1.0),  # groups shorter than a vector: the scalar remainder of the sums
    (2, 9, 48, 48, 30.0),  # one group; gates far into both tails of the sigmoid
])
def test_gated_norm_kernel_matches_float64(count_calls, b, seqlen, width, group, scale):
    """Output and the gradients w.r.t. x, the gate (a strided slice, as the input projection's
    output is) and the weight against the composite reference in float64."""
    calls = count_calls(kc, "gated_norm_forward")
    g = torch.Generator().manual_seed(width)
    x = torch.randn(b, seqlen, width, generator=g)
    wide = torch.randn(b, seqlen, width + 7, generator=g) * scale
    weight = torch.randn(width, generator=g)
    grad = torch.randn(b, seqlen, width, generator=g)

    kernel = implementation("gated_rms_norm", "cpu.c")

    def run(dtype, fast):
        w = weight.to(dtype, copy=True).requires_grad_()
        xs = x.to(dtype, copy=True).requires_grad_()
        wide_ = wide.to(dtype, copy=True).requires_grad_()
        norm = kernel.fn if fast else ops.gated_rms_norm.reference
        out = norm(xs, wide_[..., 3:3 + width], w, group, 1e-5)
        (out * grad.to(dtype)).sum().backward()
        return out.detach(), xs.grad, wide_.grad, w.grad

    assert kernel.fits(x, wide[..., 3:3 + width], weight, group, 1e-5)
    got = run(torch.float32, True)
    assert len(calls) == 1
    want = run(torch.float64, False)
    for name, a, r in zip(["out", "dx", "dgate", "dweight"], got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        torch.testing.assert_close(a.double(), r, atol=2e-6 * r.abs().max().item(), rtol=1e-5, msg=name)
    with torch.no_grad():  # inference: the kernel without keeping 1/rms, the same output
        torch.testing.assert_close(kernel.fn(x, wide[..., 3:3 + width], weight, group, 1e-5), got[0],
                                   atol=0, rtol=0)
    assert len(calls) == 2


def test_gated_norm_kernel_fits_only_where_it_runs():
    x, gate, w = torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(32)
    assert kc.gated_norm_fits(x, gate, w, 16) == kc.mamba_kernels_available()
    assert not kc.gated_norm_fits(x.double(), gate.double(), w.double(), 16)
    assert not kc.gated_norm_fits(x, gate, w, 12)  # 32 channels are not groups of 12
    assert not kc.gated_norm_fits(x.transpose(1, 2).contiguous().transpose(1, 2), gate, w, 16)
    assert not kc.gated_norm_fits(x[0], gate[0], w, 16)  # 2-D
    with kc.torch_only():
        assert not kc.gated_norm_fits(x, gate, w, 16)


@needs_ssd
def test_gated_norm_kernel_names_a_mismatch():
    with pytest.raises(ValueError, match=r"weight \(16,\) do not fit groups of 8"):
        kc.gated_norm_forward(torch.randn(1, 3, 32), torch.randn(1, 3, 32), torch.randn(16), 8, 1e-5, False)


@needs_ssd
def test_rms_norm_kernel_matches_float64(count_calls):
    """The plain RMSNorm through the same kernel (no gate, one group): output and the gradients
    w.r.t. a strided input and the weight against F.rms_norm in float64."""
    calls = count_calls(kc, "gated_norm_forward")
    kernel = implementation("rms_norm", "cpu.c")
    g = torch.Generator().manual_seed(8)
    wide = torch.randn(3, 40, 100, generator=g) * 2
    weight = torch.rand(88, generator=g) + 0.5
    grad = torch.randn(3, 40, 88, generator=g)

    def run(dtype, fast):
        base = wide.to(dtype, copy=True).requires_grad_()
        w = weight.to(dtype, copy=True).requires_grad_()
        x = base[..., 5:93]
        if fast:
            assert kernel.fits(x, w, 1e-5)
            out = kernel.fn(x, w, 1e-5)
        else:
            out = F.rms_norm(x, (88,), w, 1e-5)
        (out * grad.to(dtype)).sum().backward()
        return out.detach(), base.grad, w.grad

    got = run(torch.float32, True)
    assert len(calls) == 1
    want = run(torch.float64, False)
    for name, a, r in zip(["out", "dx", "dweight"], got, want, strict=True):
        torch.testing.assert_close(a.double(), r, atol=2e-6 * r.abs().max().item(), rtol=1e-5, msg=name)
