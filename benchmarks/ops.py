"""Every operation of kinetic.ops, each implementation that takes a call timed against the operation's
reference and against the other implementations, on the shapes of one model (default: the quickstart
recipe's, configs/quickstart.toml).

For each operation and shape, the candidates are the reference and every registered implementation
whose ``fits`` accepts the call (in the mode's autograd state: ``fwd`` runs under ``torch.no_grad()``,
``fwd+bwd`` takes the gradients of the differentiable inputs with ``torch.autograd.grad``). After a
warm-up call of each, the candidates take turns -- every repeat runs each once, in a rotating order --
so a machine that speeds up or slows down shifts them alike; each sample is the mean of enough calls to
last ``--min-time``, and the table reports the median sample. The shapes:

- ``train``: ``--batch`` x ``--seq`` tokens (default 4 x 512, as benchmarks/model_speed.py), forward
  without autograd (an inference forward or a prefill) and forward + backward (a training step);
- ``decode``: one token over a cache of each of ``--contexts`` tokens (default 1K and 8K) for the
  attention, one token for the rest;
- ``verify``: a speculative verification of ``--verify`` tokens (default 4) after such a cache.

Columns: ``ms`` per call; ``vs ref``, the reference's time over this one (above 1: faster than the
reference); ``vs fallback``, the same against what would run in its place if this implementation
were removed (the next implementation in the operation's order that fits, else the reference, named
in the JSON), which says whether it pays where it is; ``vs best other``, against the fastest other
candidate (above 1: the fastest of all, by that margin). ``*`` marks what the operation runs now.
``best ms`` is the fastest sample (the JSON's ``best_*`` ratios compare those: on a machine shared
with other processes a parallel region that waits for a busy core inflates the median of small
calls). ``err`` is the largest difference of the forward outputs from the reference's, relative to
their largest magnitude. (``split_channels`` alone only shows the cost of its backward's copies: its
fast implementation pays through the consumers that write their gradients in place, which time with
it in benchmarks/model_speed.py.)

On a machine shared with other processes, ``--threads 1``: with two threads every parallel region
waits for the other core, and when another process holds it, for its next time slice (milliseconds,
whatever the call's size), which swamps the small calls.

To see what a CPU without AVX-512 gets on one that has it, build the C kernels for AVX2 and keep
torch's own kernels, MKL and oneDNN at AVX2 (the decode-attention kernel needs AVX-512 and steps
aside)::

    python benchmarks/ops.py                                          # every operation
    python benchmarks/ops.py --ops ssd_chunk_scan routed_experts --repeats 30 --json /tmp/ops.json
    KINETIC_KERNEL_MARCH=haswell ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/ops.py --json /tmp/ops_avx2.json

Past results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kinetic
import kinetic.model  # noqa: F401  (declares ssd_chunk_scan)
from kinetic import ops
from kinetic.config import ModelConfig
from kinetic.kernels import cpu as cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "quickstart.toml"
SHAPES = ("train", "decode", "verify")


@dataclass
class Case:
    """One call of an operation: ``args`` (positional), the indices of the differentiable ones."""

    op: str
    shape: str  # the label printed, e.g. "train 4x512"
    kind: str  # one of SHAPES
    args: tuple
    grads: tuple[int, ...] = ()
    modes: tuple[str, ...] = field(default=("fwd",))


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed)) * scale


def _weight(width: int, seed: int) -> torch.Tensor:
    """A norm's weight: around 1."""
    return torch.rand(width, generator=_g(seed)) + 0.5


def model_config(recipe: str | None, preset: str | None) -> tuple[ModelConfig, str]:
    """The model whose shapes are timed: a preset, else a recipe's [model] section."""
    if preset:
        return kinetic.preset(preset), f"preset {preset}"
    from kinetic.train.config import from_dict
    from kinetic.train.trainer import model_config_from

    path = Path(recipe or RECIPE)
    with open(path, "rb") as f:
        section = tomllib.load(f).get("model", {})
    return model_config_from(from_dict({"model": section})), str(path)


def cases(c: ModelConfig, batch: int, seq: int, contexts: list[int], verify: int,
          kinds: tuple[str, ...] = SHAPES) -> Iterator[Case]:
    """The calls the model makes, at its sizes: training (``batch`` x ``seq``), a decode step after
    each of ``contexts`` cached tokens, and a verification of ``verify`` tokens."""
    d, eps = c.hidden_size, c.layer_norm_epsilon
    heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    mh, mp, groups, n = c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size
    inner, conv_dim, taps = c.mamba_intermediate_size, c.mamba_conv_dim, c.conv_kernel
    experts, k, inter = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    width = c.moe_latent_size or d
    mlp = c.moe_shared_expert_intermediate_size or c.intermediate_size
    vocab = c.vocab_size
    sizes = [inner, conv_dim, mh]
    both = ("fwd", "fwd+bwd")

    def projection(b: int, length: int, seed: int) -> torch.Tensor:
        """Mamba-2's in_proj output (b, l, z | xBC | dt): the gate and the conv input are its slices."""
        return _randn(b, length, sum(sizes), seed=seed)

    def routing(tokens: int, seed: int):
        scores = torch.randn(tokens, experts, generator=_g(seed)).sigmoid()
        bias = _randn(experts, seed=seed + 1, scale=0.05)
        return scores, bias

    def experts_call(tokens: int, seed: int) -> tuple:
        scores, bias = routing(tokens, seed)
        indices = ops.route_topk.reference(scores, bias, c.n_group, c.topk_group, k)
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * c.routed_scaling_factor
        up = _randn(experts, inter, width, seed=seed + 2, scale=width ** -0.5)
        down = _randn(experts, width, inter, seed=seed + 3, scale=inter ** -0.5)
        return _randn(tokens, width, seed=seed + 4), indices, weights, up, down

    def ssd_call(b: int, length: int, seed: int) -> tuple:
        lo, hi = math.log(c.time_step_min), math.log(c.time_step_max)
        dt = torch.exp(torch.rand(b, length, mh, generator=_g(seed)) * (hi - lo) + lo)
        A = -torch.arange(1, mh + 1, dtype=torch.float32)
        return (_randn(b, length, mh, mp, seed=seed + 1), dt, A, _randn(b, length, groups, n, seed=seed + 2),
                _randn(b, length, groups, n, seed=seed + 3), c.chunk_size, None,
                torch.ones(mh))

    if "train" in kinds:
        label = f"train {batch}x{seq}"
        zxbcdt = projection(batch, seq, 1)
        z, xbc, _ = torch.split(zxbcdt, sizes, dim=-1)
        tokens = batch * seq
        yield Case("rms_norm", label, "train", (_randn(batch, seq, d, seed=2), _weight(d, 3), eps), (0, 1),
                   both)
        yield Case("gated_rms_norm", label, "train",
                   (_randn(batch, seq, inner, seed=4), z, _weight(inner, 5), inner // groups, eps), (0, 1, 2),
                   both)
        yield Case("causal_conv1d_silu", label, "train",
                   (xbc, _randn(conv_dim, taps, seed=6, scale=taps ** -0.5),
                    _randn(conv_dim, seed=7, scale=0.1), None), (0, 1, 2), both)
        yield Case("split_channels", label, "train", (zxbcdt, sizes), (0,), both)
        yield Case("ssd_chunk_scan", label, "train", ssd_call(batch, seq, 8), (0, 1, 2, 3, 4, 7), both)
        yield Case("route_topk", label, "train", (*routing(tokens, 9), c.n_group, c.topk_group, k))
        yield Case("routed_experts", label, "train", experts_call(tokens, 10), (0, 2, 3, 4), both)
        yield Case("causal_attention", label, "train",
                   (_randn(batch, seq, heads, hd, seed=11), _randn(batch, seq, kv, hd, seed=12),
                    _randn(batch, seq, kv, hd, seed=13)), (0, 1, 2), both)
        yield Case("relu_squared", label, "train", (_randn(batch, seq, mlp, seed=14),), (0,), both)
        yield Case("lm_head_logits", label, "train",
                   (_randn(batch, seq, d, seed=15), _randn(vocab, d, seed=16, scale=d ** -0.5)), (0, 1), both)
        yield Case("linear_cross_entropy", label, "train",
                   (_randn(batch, seq, d, seed=15), _randn(vocab, d, seed=16, scale=d ** -0.5),
                    torch.randint(0, vocab, (batch, seq), generator=_g(17))), (0, 1), both)

    steps = [(kind, length) for kind, length in (("decode", 1), ("verify", verify)) if kind in kinds]
    for kind, length in steps:
        label = f"{kind} {length}"
        for context in contexts:  # the new keys are written into a reserved buffer, as InferenceCache does
            keys = context + length
            kbuf = _randn(1, kv, keys + 64, hd, seed=20 + context)
            vbuf = _randn(1, kv, keys + 64, hd, seed=21 + context)
            yield Case("cached_attention", f"{label} @{context // 1024}K" if context % 1024 == 0
                       else f"{label} @{context}", kind,
                       (_randn(1, heads, length, hd, seed=22), kbuf[:, :, :keys], vbuf[:, :, :keys], context))
        z = projection(1, length, 23)[..., :inner]
        yield Case("gated_rms_norm", label, kind,
                   (_randn(1, length, inner, seed=24), z, _weight(inner, 25), inner // groups, eps))
        if length > 1:  # a single token's conv is the mixer's own step
            xbc = projection(1, length, 26)[..., inner:inner + conv_dim]
            yield Case("causal_conv1d_silu", label, kind,
                       (xbc, _randn(conv_dim, taps, seed=27, scale=taps ** -0.5), _randn(conv_dim, seed=28),
                        _randn(1, conv_dim, taps - 1, seed=29)))
        yield Case("rms_norm", label, kind, (_randn(1, length, d, seed=30), _weight(d, 31), eps))
        yield Case("route_topk", label, kind, (*routing(length, 32), c.n_group, c.topk_group, k))
        yield Case("routed_experts", label, kind, experts_call(length, 33))
        yield Case("relu_squared", label, kind, (_randn(1, length, mlp, seed=34),))
        yield Case("lm_head_logits", label, kind, (_randn(1, length, d, seed=35),
                                                   _randn(vocab, d, seed=16, scale=d ** -0.5)))


# ---------------------------------------------------------------------- timing
def _outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, tuple | list) else (out,)) if torch.is_tensor(o)]


def _inputs(case: Case, mode: str) -> tuple[list, list[torch.Tensor]]:
    """The call's arguments for ``mode`` and its differentiable leaves (strides kept: a slice of a
    projection stays a strided slice)."""
    args = list(case.args)
    leaves = []
    if mode == "fwd+bwd":
        for i in case.grads:
            args[i] = args[i].detach().requires_grad_()
            leaves.append(args[i])
    return args, leaves


def _runner(fn: Callable, args: list, leaves: list[torch.Tensor], mode: str,
            probes: list[torch.Tensor]) -> Callable[[], None]:
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                fn(*args)
        return run

    def run() -> None:
        pairs = [(o, p) for o, p in zip(_outputs(fn(*args)), probes, strict=True) if o.requires_grad]
        torch.autograd.grad([o for o, _ in pairs], leaves, [p for _, p in pairs], allow_unused=True)
    return run


def _error(got: Any, want: Any) -> float:
    errors = [0.0]
    for a, b in zip(_outputs(got), _outputs(want), strict=True):
        if not b.is_floating_point():
            errors.append(0.0 if torch.equal(a, b) else math.inf)
            continue
        scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
        errors.append((a.float() - b.float()).abs().max().item() / scale if b.numel() else 0.0)
    return max(errors)


def measure(case: Case, mode: str, repeats: int, min_time: float) -> list[dict] | None:
    """The rows of one (operation, shape, mode): the reference and each implementation that fits,
    timed in turns; None when no implementation fits (nothing to compare)."""
    args, leaves = _inputs(case, mode)
    grad_mode = torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad()
    with grad_mode:
        impls = ops.implementations(case.op)
        fitting = [impl for impl in impls if impl.fits(*args)]
        chosen = ops.chosen(case.op, *args)
    if not fitting:
        return None
    reference = ops.operations()[case.op]
    names = ["reference"] + [impl.name for impl in fitting]
    fns = {"reference": reference, **{impl.name: impl.fn for impl in fitting}}
    with torch.no_grad():
        want = reference(*args)
        errors = {name: _error(fn(*args), want) for name, fn in fns.items()}
    gen = _g(99)
    probes = [torch.randn(o.shape, generator=gen, dtype=o.dtype) if o.is_floating_point() else None
              for o in _outputs(want)]
    runs = {name: _runner(fn, args, leaves, mode, probes) for name, fn in fns.items()}
    number = {}
    for name, run in runs.items():  # warm-up, then as many calls per sample as fill min_time
        run()
        once = math.inf
        for _ in range(3):  # the fastest of three: a call that waited for a busy core says little
            t0 = time.perf_counter()
            run()
            once = min(once, time.perf_counter() - t0)
        number[name] = max(1, math.ceil(min_time / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run, count = runs[name], number[name]
            t0 = time.perf_counter()
            for _ in range(count):
                run()
            samples[name].append((time.perf_counter() - t0) / count)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in samples.items()}
    best = {name: 1e3 * min(ts) for name, ts in samples.items()}
    rows = []
    for name in names:
        if name == "reference":
            fallback = None
        else:  # what the operation runs without this implementation
            after = [impl.name for impl in fitting[[i.name for i in fitting].index(name) + 1:]]
            fallback = after[0] if after else "reference"
        others = {other: t for other, t in ms.items() if other != name}
        best_other = min(others, key=others.get)
        rows.append({
            "op": case.op, "shape": case.shape, "kind": case.kind, "mode": mode, "implementation": name,
            "chosen": name == chosen, "ms": ms[name], "best_ms": best[name],
            "samples_ms": [1e3 * t for t in samples[name]],
            "calls_per_sample": number[name], "vs_reference": ms["reference"] / ms[name],
            "fallback": fallback, "vs_fallback": None if fallback is None else ms[fallback] / ms[name],
            "best_other": best_other, "vs_best_other": others[best_other] / ms[name],
            "max_err": errors[name],
            # the same ratios between the fastest samples (less sensitive to other processes)
            "best_vs_reference": best["reference"] / best[name],
            "best_vs_fallback": None if fallback is None else best[fallback] / best[name],
        })
    return rows


# ---------------------------------------------------------------------- report
def environment() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_cpu": "avx512f" in cpu_kernels._cpu_flags(), "kernel_flags": cpu_kernels.compiler_flags(),
        "env": {k: os.environ.get(k) for k in ("KINETIC_KERNEL_MARCH", "ATEN_CPU_CAPABILITY",
                                               "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                                               "KINETIC_CPU_KERNELS", "KINETIC_FAST_OPS")},
        "c_kernels": {"mamba": cpu_kernels.mamba_kernels_available(),
                      "experts": cpu_kernels.experts_kernel_available(),
                      "attention": cpu_kernels.attention_kernel_available(),
                      "decode_attention": cpu_kernels.decode_attention_available()},
        "load_average": os.getloadavg()[0],
    }


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def print_table(rows: list[dict]) -> None:
    ow = max([len("operation")] + [len(r["op"]) for r in rows])
    sw = max([len("shape")] + [len(r["shape"]) for r in rows])
    iw = max([len("implementation")] + [len(r["implementation"]) + 2 for r in rows])
    header = (f"{'operation':<{ow}}  {'shape':<{sw}}  {'mode':<7}  {'implementation':<{iw}}  {'ms':>9}  "
              f"{'best ms':>9}  "
              f"{'vs ref':>7}  {'vs fallback':>11}  {'vs best other':>13}  {'err':>7}")
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        group = (r["op"], r["shape"], r["mode"])
        if last is not None and group != last:
            print()
        last = group
        name = r["implementation"] + (" *" if r["chosen"] else "")
        print(f"{r['op']:<{ow}}  {r['shape']:<{sw}}  {r['mode']:<7}  {name:<{iw}}  {r['ms']:>9.4f}  "
              f"{r['best_ms']:>9.4f}  "
              f"{_ratio(r['vs_reference']):>7}  {_ratio(r['vs_fallback']):>11}  "
              f"{_ratio(r['vs_best_other']):>13}  {r['max_err']:>7.1e}")


def print_summary(rows: list[dict]) -> None:
    """Per implementation: where it is faster than what would run without it, and where not."""
    print("\nper implementation: its time against what would run without it (vs fallback), by shape")
    names = sorted({(r["op"], r["implementation"]) for r in rows if r["implementation"] != "reference"})
    for op, name in names:
        mine = [r for r in rows if r["op"] == op and r["implementation"] == name]
        wins = sum(r["vs_fallback"] > 1 for r in mine)
        parts = ", ".join(f"{r['shape']} {r['mode']} {r['vs_fallback']:.2f}x vs {r['fallback']}"
                          for r in mine)
        print(f"  {op}/{name}: faster in {wins} of {len(mine)}: {parts}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                                    "\n\n", 1)[1])
    p.add_argument("--ops", nargs="+", metavar="NAME", choices=sorted(ops.operations()),
                   help=f"only these operations (default all: {', '.join(sorted(ops.operations()))})")
    p.add_argument("--recipe", default=None, help=f"the model of this recipe's [model] section (default "
                   f"{RECIPE.relative_to(ROOT)})")
    p.add_argument("--preset", default=None, help="a kinetic preset's model instead of the recipe's")
    p.add_argument("--batch", type=int, default=4, help="training shape: sequences (default 4)")
    p.add_argument("--seq", type=int, default=512, help="training shape: tokens per sequence (default 512)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192],
                   help="cached tokens before a decode step or verification (default 1024 8192)")
    p.add_argument("--verify", type=int, default=4, help="tokens of a verification (default 4)")
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--repeats", type=int, default=15, help="samples per candidate (median; default 15)")
    p.add_argument("--min-time", type=float, default=0.005,
                   help="seconds a sample lasts at least: short calls repeat within one (default 0.005)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and the environment as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config, what = model_config(args.recipe, args.preset)
    env = environment()
    print(f"kinetic operations: {what} shapes, float32 CPU, {env['threads']} torch threads, {env['cpu']}")
    print(f"torch {env['torch']} at {env['torch_cpu_capability']}; C kernels built with "
          f"{' '.join(f for f in env['kernel_flags'] if f.startswith('-march'))} "
          f"(available: {', '.join(k for k, v in env['c_kernels'].items() if v) or 'none'}); "
          f"1-min load average {env['load_average']:.2f}")
    print(f"median of {args.repeats} samples, candidates in turns; ratios above 1: faster than the "
          "other; * = what the operation runs now\n")
    rows, skipped = [], []
    started = time.perf_counter()
    for case in cases(config, args.batch, args.seq, args.contexts, args.verify, tuple(args.shapes)):
        if args.ops and case.op not in args.ops:
            continue
        for mode in case.modes:
            if mode not in args.modes:
                continue
            got = measure(case, mode, args.repeats, args.min_time)
            if got is None:
                skipped.append(f"{case.op} {case.shape} {mode}")
            else:
                rows += got
    print_table(rows)
    if rows:
        print_summary(rows)
    if skipped:
        print("\nno implementation takes (the reference runs): " + "; ".join(skipped))
    seconds = time.perf_counter() - started
    print(f"\n{len(rows)} rows in {seconds:.0f} s")
    report = {"model": what, "config": {"batch": args.batch, "seq": args.seq, "contexts": args.contexts,
                                        "verify": args.verify, "repeats": args.repeats,
                                        "min_time": args.min_time},
              "environment": env, "rows": rows, "no_implementation": skipped, "seconds": seconds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
