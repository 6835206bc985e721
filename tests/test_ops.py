"""kinetic.ops: every registered implementation against its operation's plain-torch reference, forward
and backward, on random inputs of ordinary and odd shapes; the switch that turns them all off; and
the import rules of the layers (model files import no kernel, no import circles, no argparse outside
the CLI)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kinetic.model  # noqa: F401  (declares ssd_chunk_scan)
from kinetic import ops
from kinetic.kernels import cpu as cpu_kernels

ROOT = Path(__file__).resolve().parents[1]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=_g(seed)) * scale


# ---------------------------------------------------------------------- random calls per operation
# Each case: (label, args, kwargs, which positional args are differentiable). Shapes include sizes
# that are not multiples of a SIMD width or of a chunk, single positions, and grouped heads.
def _norm_cases():
    for i, (b, n, w) in enumerate([(2, 5, 48), (1, 1, 37), (3, 7, 16)]):
        weight = torch.rand(w, generator=_g(i)) + 0.5
        yield f"rms-{b}x{n}x{w}", (_randn(b, n, w, seed=i), weight, 1e-5), (0, 1)


def _gated_norm_cases():
    for i, (b, n, w, gs) in enumerate([(2, 5, 48, 16), (1, 3, 40, 8), (2, 1, 24, 24)]):
        yield (f"gated-{b}x{n}x{w}/{gs}", (_randn(b, n, w, seed=i), _randn(b, n, w, seed=i + 9),
               torch.rand(w, generator=_g(i)) + 0.5, gs, 1e-5), (0, 1, 2))


def _conv_cases():
    for i, (b, n, c, k, bias, state) in enumerate([(2, 11, 24, 4, True, False), (1, 1, 10, 2, False, False),
                                                     (2, 3, 24, 4, True, True), (1, 20, 8, 4, True, True),
                                                     (3, 1, 16, 3, False, True)]):
        args = (_randn(b, n, c, seed=i), _randn(c, k, seed=i + 1, scale=0.5),
                _randn(c, seed=i + 2) if bias else None, _randn(b, c, k - 1, seed=i + 3) if state else None)
        yield f"conv-{b}x{n}x{c}-k{k}{'-bias' if bias else ''}{'-state' if state else ''}", args, (0, 1, 2)


def _split_cases():
    yield "split-5-7-3", (_randn(2, 4, 15), [5, 7, 3]), (0,)


def _ssd_case(b, t, h, g, p, n, chunk, initial, skip, seed):
    x = _randn(b, t, h, p, seed=seed)
    dt = torch.rand(b, t, h, generator=_g(seed + 1)) * 0.5 + 0.01
    A = -(torch.rand(h, generator=_g(seed + 2)) * 2 + 0.1)
    B, C = _randn(b, t, g, n, seed=seed + 3), _randn(b, t, g, n, seed=seed + 4)
    s0 = _randn(b, h, p, n, seed=seed + 5) if initial else None
    D = torch.rand(h, generator=_g(seed + 6)) if skip else None
    grads = (0, 1, 2, 3, 4) + ((6,) if initial else ()) + ((7,) if skip else ())
    return f"ssd-{b}x{t}-h{h}g{g}p{p}n{n}-L{chunk}", (x, dt, A, B, C, chunk, s0, D), grads


def _ssd_cases():
    yield _ssd_case(2, 37, 4, 2, 16, 16, 16, True, True, 0)  # the C kernels' sizes, a ragged last chunk
    yield _ssd_case(1, 19, 6, 3, 8, 8, 8, False, True, 10)
    yield _ssd_case(2, 5, 2, 1, 16, 32, 64, True, False, 20)  # shorter than a chunk
    yield _ssd_case(1, 1, 4, 4, 16, 16, 8, True, True, 30)


def _route_cases():
    shapes = [(9, 8, 4, 2, 2), (5, 16, 1, 1, 3), (7, 6, 2, 1, 2), (1, 32, 8, 3, 4)]
    for i, (t, e, ng, tg, k) in enumerate(shapes):
        scores = torch.randn(t, e, generator=_g(i)).sigmoid()
        yield f"route-{t}x{e}-g{ng}/{tg}-k{k}", (scores, _randn(e, seed=i + 1, scale=0.1), ng, tg, k), ()


def _experts_cases():
    for i, (t, e, k, w, inter) in enumerate([(5, 8, 2, 16, 24), (40, 6, 3, 12, 20), (17, 16, 2, 32, 8)]):
        indices = torch.stack([torch.randperm(e, generator=_g(i * 100 + j))[:k] for j in range(t)])
        weights = torch.rand(t, k, generator=_g(i))
        args = (_randn(t, w, seed=i), indices, weights, _randn(e, inter, w, seed=i + 1, scale=w ** -0.5),
                _randn(e, w, inter, seed=i + 2, scale=inter ** -0.5))
        yield f"experts-{t}x{k}of{e}-w{w}i{inter}", args, (0, 2, 3, 4)


def _causal_attention_cases():
    for i, (b, n, h, kv, d) in enumerate([(2, 9, 4, 2, 16), (1, 70, 2, 2, 8), (1, 1, 3, 1, 12)]):
        yield (f"causal-{b}x{n}-h{h}kv{kv}d{d}", (_randn(b, n, h, d, seed=i), _randn(b, n, kv, d, seed=i + 1),
               _randn(b, n, kv, d, seed=i + 2)), (0, 1, 2))


def _cached_attention_cases():
    # (b, heads, kv_heads, d, new queries, start, keys): keys = start + queries for a growing cache
    for i, (b, h, kv, d, s, start, n) in enumerate([
            (2, 4, 2, 16, 1, 40, 41),  # a decode step
            (1, 8, 2, 32, 1, 1500, 1501),
            (1, 4, 2, 16, 20, 30, 50),  # a prefill chunk after cached tokens
            (2, 4, 2, 12, 3, 10, 13),  # a verification: a few queries over a short context
            (1, 2, 2, 16, 6, 0, 6),  # a prefill into an empty cache
            (1, 4, 2, 16, 1, torch.tensor(5), 16),  # a fixed-capacity buffer, the tail unwritten
            (2, 4, 1, 8, 3, torch.tensor(9), 24),
            (3, 4, 2, 16, 1, torch.tensor([4, 19, 0]), 20),  # a batch at different positions
            (2, 4, 2, 8, 3, torch.tensor([7, 2]), 10)]):  # its speculative verification
        at = "-".join(map(str, start.tolist())) if torch.is_tensor(start) and start.dim() else int(start)
        label = f"cached-{b}-h{h}kv{kv}d{d}-s{s}-at{at}-n{n}"
        yield (label, (_randn(b, h, s, d, seed=i), _randn(b, kv, n, d, seed=i + 1),
                       _randn(b, kv, n, d, seed=i + 2), start), (0, 1, 2))


def _head_cases():
    yield "head-1x16", (_randn(1, 1, 16), _randn(50, 16, seed=1)), (0, 1)
    yield "head-3x16", (_randn(1, 3, 16), _randn(50, 16, seed=1)), (0, 1)
    yield "head-huge", (_randn(2, 1024, 8), _randn(4096, 8, seed=1)), (0, 1)  # 32 MiB of logits


def _loss_cases():
    targets = torch.randint(0, 50, (3, 400), generator=_g(1))
    targets[0, :7] = -100
    yield "loss-1200-tokens", (_randn(3, 400, 16), _randn(50, 16, seed=2), targets), (0, 1)
    yield "loss-all-ignored", (_randn(1, 4, 16), _randn(50, 16, seed=2), torch.full((1, 4), -100)), (0, 1)


def _relu2_cases():
    yield "relu2-7x13", (_randn(7, 13),), (0,)


CASES = {
    "rms_norm": _norm_cases, "gated_rms_norm": _gated_norm_cases, "causal_conv1d_silu": _conv_cases,
    "split_channels": _split_cases, "ssd_chunk_scan": _ssd_cases, "route_topk": _route_cases,
    "routed_experts": _experts_cases, "causal_attention": _causal_attention_cases,
    "cached_attention": _cached_attention_cases, "lm_head_logits": _head_cases,
    "linear_cross_entropy": _loss_cases, "relu_squared": _relu2_cases,
}
TOLERANCE = {"ssd_chunk_scan": 2e-4, "linear_cross_entropy": 1e-5}
# implementations that cannot take a call on this machine's CPU tensors, by design
CUDA_ONLY = {"sdpa.split-kv-decode", "sdpa.static-split-kv"}


def _outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, tuple | list) else (out,)) if torch.is_tensor(o)]


def _run(fn, args, grads, seed=0):
    """fn's outputs on fresh copies of args and, when ``grads``, the gradients of a fixed random
    projection of them with respect to those args."""
    args = [a.detach().clone().requires_grad_(i in grads) if torch.is_tensor(a) and a.is_floating_point()
            else a for i, a in enumerate(args)]
    grads = [i for i in grads if torch.is_tensor(args[i])]
    outs = _outputs(fn(*args))
    if not grads:
        return [o.detach() for o in outs], []
    loss = sum((o.float() * torch.randn(o.shape, generator=_g(seed + j))).sum() for j, o in enumerate(outs)
               if o.requires_grad)
    got = torch.autograd.grad(loss, [args[i] for i in grads], allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros_like(args[i]) if g is None else g
                                        for i, g in zip(grads, got, strict=True)]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    if not a.is_floating_point():
        assert torch.equal(a, b)
        return
    scale = b.abs().max().clamp(min=1.0)
    assert (a - b).abs().max() <= rtol * scale, f"max error {(a - b).abs().max():.3g} (scale {scale:.3g})"


def _pairs():
    for op in sorted(CASES):
        for impl in ops.implementations(op):
            yield pytest.param(op, impl, id=f"{op}-{impl.name}")


def test_every_operation_has_cases_and_every_implementation_a_declared_operation():
    declared = set(ops.operations())
    assert declared == set(CASES), "an operation without random cases here, or cases of a missing one"
    for op in declared:
        for impl in ops.implementations(op):
            assert impl.op == op


@pytest.mark.parametrize(("op", "impl"), list(_pairs()))
def test_implementation_matches_the_reference(op, impl):
    reference = ops.operations()[op]
    rtol = TOLERANCE.get(op, 2e-5)
    taken = 0
    for label, args, grads in CASES[op]():
        for training in (True, False):
            with torch.set_grad_enabled(training):
                live = [a.detach().requires_grad_(training and i in grads)
                        if torch.is_tensor(a) and a.is_floating_point() else a for i, a in enumerate(args)]
                if not impl.fits(*live):
                    continue
                taken += 1
                want, want_grads = _run(reference, args, grads if training else ())
                got, got_grads = _run(impl.fn, args, grads if training else ())
            assert len(got) == len(want), label
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape, label
                _close(g, w, rtol)
            for g, w in zip(got_grads, want_grads, strict=True):
                _close(g, w, 10 * rtol)
    if not taken:
        if impl.name in CUDA_ONLY:
            pytest.skip(f"{impl.name} takes CUDA tensors only")
        if impl.name.startswith("cpu.") and not cpu_kernels.mamba_kernels_available():
            pytest.skip("the C kernels do not run here")
        pytest.fail(f"{impl.name} took none of the {op} cases; give it one it fits")


def test_one_switch_turns_every_fast_path_off():
    x, w = _randn(2, 5, 48), torch.ones(48)
    with torch.no_grad():
        assert ops.chosen("gated_rms_norm", x, x, w, 16, 1e-5) != "reference" or not ops.implementations(
            "gated_rms_norm")
        with ops.reference_only():
            for op in ops.operations():
                for _, args, _ in CASES[op]():
                    assert ops.chosen(op, *args) == "reference"
    code = ("import kinetic.model, torch; from kinetic import ops; x = torch.randn(2, 5, 48); "
            "print(ops.chosen('gated_rms_norm', x, x, torch.ones(48), 16, 1e-5))")
    env = {"KINETIC_FAST_OPS": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.stdout.strip() == "reference", done.stderr


def test_the_model_runs_on_the_references_alone():
    from kinetic.model import NemotronHForCausalLM
    from tests.conftest import make_config, randomize

    model = randomize(NemotronHForCausalLM(make_config("latent-grouped-mtp")))
    ids = torch.randint(0, 96, (2, 21), generator=_g(3))
    fast = model(ids, labels=ids, return_logits=True)
    fast.loss.backward()
    fast_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    with ops.reference_only():
        ref = model(ids, labels=ids, return_logits=True)
        ref.loss.backward()
    _close(fast.logits, ref.logits, 1e-4)
    _close(fast.loss, ref.loss, 1e-5)
    for g, p in zip(fast_grads, [p for p in model.parameters() if p.grad is not None], strict=True):
        _close(g, p.grad, 1e-4)


# ---------------------------------------------------------------------- the layers' import rules
def _imports(path: Path) -> list[str]:
    """Every kinetic module ``path`` imports, at module level or inside functions."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up from this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module
                candidate = f"{base}.{alias.name}"
                found.append(candidate if _module_path(candidate) else base)
    return [name for name in found if name == "kinetic" or name.startswith("kinetic.")]


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((ROOT / "kinetic").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = {name for name in _imports(path) if _module_path(name) and name != module}
    return graph


def test_there_are_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_model_files_import_no_kernel_and_libraries_no_cli():
    graph = _graph()
    for module, imported in graph.items():
        if module.startswith("kinetic.model"):
            assert not any(name.startswith("kinetic.kernels") for name in imported), module
        if not module.startswith("kinetic.cli"):
            assert not any(name.startswith("kinetic.cli") for name in imported), module
            source = _module_path(module).read_text()
            assert "import argparse" not in source, module


def test_without_avx512_the_kernels_take_only_the_calls_they_win(monkeypatch):
    """On kernels built for narrower SIMD (AVX2) the experts kernel takes only decode-sized calls and
    the attention kernel only training (kinetic.kernels.cpu_ops); the conv and norms take every call
    they can run; with AVX-512 every kernel does."""
    if not (cpu_kernels.mamba_kernels_available() and cpu_kernels.experts_kernel_available()
            and cpu_kernels.attention_kernel_available()):
        pytest.skip("the C kernels do not run here")
    big = _randn(2, 64, 48).requires_grad_()
    w = torch.ones(48, requires_grad=True)
    conv_w = _randn(48, 4, scale=0.5).requires_grad_()
    q, k = _randn(1, 32, 4, 16).requires_grad_(), _randn(1, 32, 2, 16).requires_grad_()
    indices = torch.stack([torch.randperm(8, generator=_g(j))[:2] for j in range(4)])
    experts = (_randn(4, 16), indices, torch.rand(4, 2), _randn(8, 24, 16), _randn(8, 16, 24))
    c_experts = next(i for i in ops.implementations("routed_experts") if i.name == "cpu.c")

    def choices():
        with torch.no_grad():
            inference = (c_experts.fits(*experts), ops.chosen("causal_attention", q, k, k))
        training_experts = (experts[0].clone().requires_grad_(), *experts[1:])
        return (ops.chosen("causal_conv1d_silu", big, conv_w, None),
                ops.chosen("gated_rms_norm", big, big, w, 16, 1e-5), c_experts.fits(*training_experts),
                ops.chosen("causal_attention", q, k, k), *inference)

    monkeypatch.setattr(cpu_kernels, "wide_simd", lambda: True)
    assert choices() == ("cpu.c", "cpu.c", True, "cpu.c", True, "cpu.c")
    monkeypatch.setattr(cpu_kernels, "wide_simd", lambda: False)
    assert choices() == ("cpu.c", "cpu.c", False, "cpu.c", True, "sdpa.causal")


def test_wide_simd_means_an_avx512_build():
    if not cpu_kernels.mamba_kernels_available():
        pytest.skip("the C kernels do not run here")
    march = __import__("os").environ.get("KINETIC_KERNEL_MARCH", "native")
    if march != "native":
        pytest.skip("kernels built for another CPU")
    assert cpu_kernels.wide_simd() == ("avx512f" in cpu_kernels._cpu_flags())
