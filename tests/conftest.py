"""Shared test helpers: tiny configs that together cover every NemotronH feature, and weights with
realistic scales (1/sqrt(fan_in) matrices, non-trivial norms and balancing biases) so that routing,
gating and the SSM state all matter to the logits."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
import warnings

import pytest
import torch

from kinetic.config import ModelConfig

# Each entry: a name and the overrides of a base tiny config. Together they cover every layer type,
# MoE with/without latent projection, group-limited routing, shared experts, MTP on/off, and
# Mamba with one or several B/C groups.
BASE = dict(
    vocab_size=96, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
    intermediate_size=80, ssm_state_size=8, mamba_num_heads=6, mamba_head_dim=8, n_groups=2,
    conv_kernel=4, chunk_size=8, n_routed_experts=8, moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=40, num_experts_per_tok=2, routed_scaling_factor=2.5,
    time_step_limit=(0.001, math.inf),  # transformers clamps prefill dt at time_step_min
)
CONFIGS = {
    "latent-grouped-mtp": dict(hybrid_override_pattern="M*EM-E", moe_latent_size=32, n_group=4,
                               topk_group=2, num_nextn_predict_layers=1,
                               mtp_hybrid_override_pattern="*E"),
    "dense-moe-1group": dict(hybrid_override_pattern="ME*-M", n_groups=1, n_group=1, topk_group=1),
    "unnormed-topk": dict(hybrid_override_pattern="E-*ME", norm_topk_prob=False,
                          routed_scaling_factor=1.0, n_group=2, topk_group=1, num_experts_per_tok=3,
                          moe_latent_size=16, n_groups=3),
    "mtp-two-depths": dict(hybrid_override_pattern="MEM*", num_nextn_predict_layers=2,
                           mtp_hybrid_override_pattern="M*E", n_group=2, topk_group=2),
}


def make_config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name], **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, dt_bias: float | None = None) -> torch.nn.Module:
    """Realistic-scale random weights. ``dt_bias`` set: Mamba Δt biases to that value (large enough
    values keep Δt above time_step_min, where transformers' prefill and decode agree)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2:
            # last dim is the fan-in for linears, 3-D expert stacks and the depthwise conv kernel
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        elif "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif leaf == "dt_bias" and dt_bias is not None:
            p.fill_(dt_bias)
        elif leaf == "A_log":
            p.copy_(torch.log(torch.rand(p.shape, generator=g) * 7 + 1))
        elif leaf in ("D", "bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)
    return model


def uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` by full forwards, no cache at all: the decoders' reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), return_mtp=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def drain(decoder, seqs, limits) -> list[list[int]]:
    """Step a :class:`kinetic.infer.decoder.Decoder` until each of ``seqs`` has its number of tokens
    (``limits``: one per sequence, or shared), cancelling each when it has; their token ids."""
    limits = [limits] * len(seqs) if isinstance(limits, int) else limits
    want = {id(s): n for s, n in zip(seqs, limits, strict=True)}
    while decoder.busy:
        for s, _ in decoder.step():
            if len(s.tokens) >= want.get(id(s), 0):
                decoder.cancel(s)
    return [[t.id for t in s.tokens[:want[id(s)]]] for s in seqs]


@pytest.fixture
def transformers_mod():
    return pytest.importorskip("transformers")


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, name)`` wraps ``module.name`` for the test and returns a list that grows
    by one entry per call (to check that a kernel ran, or did not)."""
    def install(module, name: str) -> list[int]:
        calls: list[int] = []
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
        return calls
    return install


@pytest.fixture
def failed_build(monkeypatch, tmp_path):
    """``with failed_build(loader, message, available):`` builds kinetic's CPU kernels with a compiler
    that always fails. ``available()`` warns once (``message``), then stays False without a second
    warning; inside the block the test checks torch's fallback. The cached ``loader`` of
    kinetic.kernels.cpu is cleared on the way in and out."""
    monkeypatch.setenv("KINETIC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")

    @contextlib.contextmanager
    def fails(loader, message: str, available):
        loader.cache_clear()
        try:
            with pytest.warns(UserWarning, match=message):
                assert not available()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the failure is remembered: no second warning
                assert not available()
            yield
        finally:
            loader.cache_clear()
    return fails


@pytest.fixture(params=["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def compile_backend(request, monkeypatch):
    """The backend ``torch.compile`` uses in a compiled-equals-eager test: AOT autograd without code
    generation in ``make test`` -- what kinetic's code decides (tracing, graph breaks, custom ops and
    their fake and backward functions, fixed shapes, reuse of compiled functions) at a fraction of
    Inductor's cold compile time -- and Inductor itself in ``make test-slow``."""
    if request.param != "inductor":
        real = torch.compile

        def compile_with(model=None, **kwargs):
            kwargs.pop("options", None)  # Inductor's options
            kwargs["backend"] = request.param
            return real(**kwargs) if model is None else real(model, **kwargs)

        monkeypatch.setattr(torch, "compile", compile_with)
    return request.param


@pytest.fixture
def kernels_off(monkeypatch):
    """``KINETIC_CPU_KERNELS=0`` for the test: every cached loader of kinetic.kernels.cpu is cleared on
    the way in and out, so the setting is read afresh and does not outlive the test."""
    import kinetic.kernels.cpu as kc

    monkeypatch.setenv("KINETIC_CPU_KERNELS", "0")
    loaders = (kc._library, kc._mamba_library, kc._experts_library, kc._attention_library)
    for loader in loaders:
        loader.cache_clear()
    yield
    for loader in loaders:
        loader.cache_clear()


@pytest.fixture
def without_blas(monkeypatch):
    """A torch that exports no ``sgemm_``: the BLAS-backed kernels (MoE experts, causal attention) are
    unavailable for the test; their cached loaders are cleared on the way in and out."""
    import kinetic.kernels.cpu as kc

    monkeypatch.setattr(kc, "_blas", lambda: None)
    loaders = (kc._experts_library, kc._attention_library)
    for loader in loaders:
        loader.cache_clear()
    yield
    for loader in loaders:
        loader.cache_clear()


@pytest.fixture
def one_thread():
    """For tests of tiny GEMMs: a second thread does not help them, and on a busy 2-core machine
    OpenMP's spin-waiting makes every matmul ~50x slower. Restored afterwards for the other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def live_server(app):
    """Serve an ASGI ``app`` with uvicorn on a free loopback port in a background thread; yields its
    base URL and stops the server afterwards."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
