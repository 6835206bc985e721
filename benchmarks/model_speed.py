"""Training and inference throughput of kinetic vs transformers' NemotronH on the same config.

What it measures, in one process and with the same torch thread count throughout:

* **peak**: the best fp32 ``torch.matmul`` rate of two large square matrices (default 2048x2048),
  probed before and after the model runs (best of both, since shared CPUs drift); this is the
  machine's practical matmul ceiling and the denominator of MFU.
* **forward**: ``model(input_ids)`` in ``eval()`` mode under ``torch.no_grad()``.
* **fwd+bwd**: ``train()`` mode, cross-entropy of the logits against the input ids shifted by one,
  ``loss.backward()``; gradients are reset (``set_to_none``) before every iteration, outside the timer.
  The loss is computed by this script from each model's logits, identically for both.
* **train**: the same step through each library's own loss path, ``model(ids, labels=ids).loss``
  then ``backward()``: transformers builds the logits and calls its loss function; kinetic fuses the
  LM head with the cross-entropy in chunks and never builds the logits (``kinetic.ops.linear_cross_entropy``,
  its "torch.chunked" implementation).

Both models get identical weights: the kinetic model (built without MTP, which transformers lacks) is
saved with ``save_pretrained`` and loaded with ``transformers.AutoModelForCausalLM.from_pretrained``
(default attention implementation, sdpa; without ``mamba_ssm``/``causal_conv1d`` transformers uses its
pure-PyTorch Mamba path). Each mode is warmed up, then the two implementations are timed in alternating
iterations (so machine noise hits both alike) and the median iteration time is reported as
tokens/s = batch * seq / median. If transformers is not installed, kinetic is benchmarked alone.

FLOPs model (identical for both implementations, so their ratio is the ratio of tokens/s)::

    N     = matmul parameters one token touches: every Linear of the main model at its active size
            (Mamba in/out projections; q, k, v, o; dense MLPs; the MoE router, latent projections,
            shared expert and num_experts_per_tok routed experts) plus lm_head; the embedding table,
            norms, depthwise convolution, biases, dt_bias, A_log and D are left out
    attn  = 2 * 2 * n_attn_layers * seq * heads * head_dim / 2      (QK^T and PV, causal half)
    ssd   = n_mamba_layers * mamba_heads * (Q * (N_s + P) + 4 * N_s * P)
            with Q = min(chunk_size, seq), N_s = ssm_state_size, P = mamba_head_dim: the chunked SSD
            scan's intra-chunk C B^T and (L o C B^T) X (2 Q N_s + 2 Q P, causal half) plus the chunk
            states B^T X and the state read-out C h (2 N_s P each); chunk-to-chunk passing is ignored
    forward FLOPs per token = 2 * N + attn + ssd
    fwd+bwd FLOPs per token = 3 * (2 * N + attn + ssd)          (= 6 N + 3 attn + 3 ssd)

    MFU = tokens/s * FLOPs per token / peak

Run (past run times and results: docs/performance.md)::

    python benchmarks/model_speed.py                      # preset small, batch 4 x seq 512
    python benchmarks/model_speed.py --batch 2 --seq 256 --iters 3 --json /tmp/speed.json
    python benchmarks/model_speed.py --breakdown          # + forward ms per kind of layer, and
                                                          #   forward+backward ms of one block of each kind
    python benchmarks/model_speed.py --compile            # + both models under torch.compile (minutes)
    python benchmarks/model_speed.py --torch-ops          # + kinetic with its C kernels stepped aside

``--compile`` adds each model wrapped in ``torch.compile`` (the same weights) as two more
implementations in the same alternation; their first warm-up iteration, which compiles, is reported
as ``first s``, and their ratio is compiled kinetic over compiled transformers.

``--torch-ops`` adds the same kinetic model with its C CPU kernels stepped aside
(``kinetic.kernels.cpu.torch_only``: every "cpu.*" implementation in kinetic.kernels.cpu_ops -- the
norms, the Mamba-2 scan and conv, the router and experts, the attention -- gives way to the torch
implementations, or the references where none fits) as another implementation in the alternation, so
the kernels' share of the speed-up is measured in the same run. benchmarks/ops.py times each
implementation of each operation alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import kinetic
from kinetic import ModelConfig
from kinetic import ops as kinetic_ops
from kinetic.kernels.cpu import torch_only
from kinetic.train.flops import flops_per_token as _flops_per_token
from kinetic.train.flops import matmul_params, measure_peak

MODES = ("forward", "fwd+bwd", "train")


def flops_per_token(c: ModelConfig, seq: int) -> dict[str, float]:
    """The kinetic.train.flops model (see the module docstring), with the train mode = fwd+bwd."""
    flops = _flops_per_token(c, seq)
    return {**flops, "train": flops["fwd+bwd"]}


def _logits(model: torch.nn.Module, ids: torch.Tensor, is_kinetic: bool) -> torch.Tensor:
    if is_kinetic:
        return model(ids, return_mtp=False).logits
    return model(input_ids=ids, use_cache=False).logits


def make_step(model: torch.nn.Module, ids: torch.Tensor, mode: str, is_kinetic: bool) -> Callable[[], float]:
    """A callable running one iteration of ``mode`` and returning its wall time in seconds."""
    if mode == "forward":
        def step() -> float:
            model.eval()
            with torch.no_grad():
                t0 = time.perf_counter()
                _logits(model, ids, is_kinetic)
                return time.perf_counter() - t0
    elif mode == "fwd+bwd":
        def step() -> float:
            model.train()
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            logits = _logits(model, ids, is_kinetic)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            return time.perf_counter() - t0
    else:  # "train": each library's own loss path, model(ids, labels=ids).loss
        def step() -> float:
            model.train()
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            if is_kinetic:
                loss = model(ids, labels=ids, return_mtp=False).loss
            else:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            return time.perf_counter() - t0
    return step


class TorchOps(torch.nn.Module):
    """A kinetic model whose forward runs with the CPU kernels stepped aside (torch's operators only);
    its backward follows the graph that forward built."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch_only():
            return self.inner(*args, **kwargs)


def bench(models: dict[str, tuple[torch.nn.Module, bool]], ids: torch.Tensor, mode: str, warmup: int,
          iters: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-implementation iteration times (implementations alternate every iteration) and the time
    of each one's first warm-up iteration (for a compiled model: compiling)."""
    steps = {name: make_step(m, ids, mode, is_k) for name, (m, is_k) in models.items()}
    first = {}
    for name, step in steps.items():
        first[name] = step()
        for _ in range(warmup - 1):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            times[name].append(step())
    for m, _ in models.values():
        m.zero_grad(set_to_none=True)
    return times, first


# forward time per kind of layer: the classes of each implementation that make up one kind
COMPONENTS = {
    "mamba": ("Mamba2Mixer", "NemotronHMamba2Mixer"),
    "moe": ("MoE", "NemotronHMoE"),
    "attention": ("Attention", "NemotronHAttention"),
}


def breakdown(model: torch.nn.Module, ids: torch.Tensor, is_kinetic: bool, iters: int) -> dict[str, float]:
    """Median forward milliseconds spent in each kind of mixer (all layers of that kind together),
    in ``lm_head``, and in everything else (embedding, norms, residual adds, dense MLP layers),
    timed with module hooks in ``eval()`` mode under ``torch.no_grad()``. kinetic's logits come from
    the operation ``kinetic.ops.lm_head_logits`` with the lm_head's weight, not from the lm_head
    module (whichever implementation runs: large logits are written into huge pages), so for kinetic
    that operation is timed instead."""
    kind_of = {cls: kind for kind, classes in COMPONENTS.items() for cls in classes}
    spent: dict[str, float] = {}
    started: dict[int, float] = {}
    hooks = []
    patched = contextlib.ExitStack()
    if is_kinetic:
        head_logits = kinetic_ops.lm_head_logits

        def timed_head_logits(*args: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            out = head_logits(*args)
            spent["lm_head"] = spent.get("lm_head", 0.0) + time.perf_counter() - t0
            return out

        # the model calls ``ops.lm_head_logits`` through the module attribute, so this takes its calls
        patched.enter_context(_patch(kinetic_ops, "lm_head_logits", timed_head_logits))
    for name, module in model.named_modules():
        if name in ("lm_head", "inner.lm_head"):
            kind = None if is_kinetic else "lm_head"
        else:
            kind = kind_of.get(type(module).__name__)
        if kind is None:
            continue
        hooks.append(module.register_forward_pre_hook(
            lambda mod, args: started.__setitem__(id(mod), time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda mod, args, out, kind=kind: spent.__setitem__(
                kind, spent.get(kind, 0.0) + time.perf_counter() - started[id(mod)])))
    runs: list[dict[str, float]] = []
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(iters + 1):  # the first is a warm-up
                spent.clear()
                t0 = time.perf_counter()
                _logits(model, ids, is_kinetic)
                total = time.perf_counter() - t0
                runs.append({**spent, "other": total - sum(spent.values()), "total": total})
    finally:
        for h in hooks:
            h.remove()
        patched.close()
    keys = [*COMPONENTS, "lm_head", "other", "total"]
    return {k: statistics.median(r.get(k, 0.0) for r in runs[1:]) * 1e3 for k in keys}


@contextlib.contextmanager
def _patch(module: Any, name: str, value: Any):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


BLOCK_KINDS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}


def block_breakdown(models: dict[str, tuple[torch.nn.Module, bool]], pattern: str, hidden: torch.Tensor,
                    iters: int) -> dict[str, dict[str, float]]:
    """Median forward+backward milliseconds of one block of each kind (its first in ``pattern``: norm,
    mixer, residual) in each implementation, on the same input ``hidden`` (batch, seq, hidden_size) in
    ``train()`` mode, loss = mean of the squared output; implementations alternate every iteration.
    Returns {implementation: {kind: ms}}."""
    def layers_of(model: torch.nn.Module, is_kinetic: bool):
        if isinstance(model, TorchOps):
            model = model.inner
        return model.backbone.layers if is_kinetic else model.model.layers

    first = {kind: pattern.index(char) for char, kind in BLOCK_KINDS.items() if char in pattern}
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for kind, index in first.items():
        times: dict[str, list[float]] = {name: [] for name in models}
        for it in range(iters + 1):  # the first is a warm-up
            for name, (model, is_kinetic) in models.items():
                layer = layers_of(model, is_kinetic)[index]
                layer.train()
                layer.zero_grad(set_to_none=True)
                x = hidden.clone().requires_grad_()
                t0 = time.perf_counter()
                with torch_only() if isinstance(model, TorchOps) else contextlib.nullcontext():
                    y = layer(x)
                y = y[0] if isinstance(y, tuple) else y
                y.square().mean().backward()
                if it:
                    times[name].append(time.perf_counter() - t0)
                layer.zero_grad(set_to_none=True)
        for name, ts in times.items():
            out[name][kind] = statistics.median(ts) * 1e3
    return out


def load_transformers(model: kinetic.NemotronHForCausalLM) -> torch.nn.Module | None:
    """The same weights as a transformers NemotronHForCausalLM, or None if transformers is missing."""
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: benchmarking kinetic alone "
              "(pip install 'transformers==5.23.0' to compare).")
        return None
    import transformers

    transformers.logging.set_verbosity_error()  # the "mamba_ssm is not installed" fallback notices
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, config_style="transformers")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return hf


def _vs_transformers(table: dict[str, dict[str, float]], key: str) -> str:
    """The ratio column of the breakdowns: transformers' ms over kinetic's."""
    if "transformers" not in table or not table["kinetic"][key] > 0:
        return ""
    return f" {table['transformers'][key] / table['kinetic'][key]:>6.2f}x"


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="kinetic preset name (default: small)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=7, help="timed iterations per mode and implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--peak-size", type=int, default=2048, help="matrix size of the peak matmul probe")
    p.add_argument("--peak-repeats", type=int, default=10)
    p.add_argument("--no-transformers", action="store_true", help="benchmark kinetic alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="also time both models under torch.compile (compiles 3 modes x 2 models: minutes)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the forward pass per kind of layer (Mamba, MoE, attention, lm_head) "
                   "and forward+backward of one block of each kind")
    p.add_argument("--torch-ops", action="store_true",
                   help="also time kinetic with its C kernels stepped aside (torch's operators only)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    torch.manual_seed(args.seed)

    # MTP off (transformers has none); Δt clamped at time_step_min as transformers' prefill does, so the
    # logit check below compares the same function (the speed of either is unaffected)
    base = kinetic.preset(args.preset)
    cfg = base.replace(num_nextn_predict_layers=0, time_step_limit=(base.time_step_min, float("inf")))
    counts = cfg.param_counts()
    flops = flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq

    peak_before = measure_peak(args.peak_size, args.peak_repeats)

    kin = kinetic.NemotronHForCausalLM(cfg)
    models: dict[str, tuple[torch.nn.Module, bool]] = {"kinetic": (kin, True)}
    if args.torch_ops:
        models["kinetic torch ops"] = (TorchOps(kin), True)
    hf = None if args.no_transformers else load_transformers(kin)
    if hf is not None:
        models["transformers"] = (hf, False)

    if args.compile:
        for name, (m, is_k) in list(models.items()):
            if name != "kinetic torch ops":  # compiled code never calls the kernels
                models[f"{name} compiled"] = (torch.compile(m), is_k)
    pairs = [(k, t) for k, t in (("kinetic", "transformers"), ("kinetic torch ops", "transformers"),
                                 ("kinetic compiled", "transformers compiled"))
             if k in models and t in models]

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)

    max_diff = None
    if hf is not None:  # sanity check that both compute the same function
        kin.eval()
        hf.eval()
        with torch.no_grad():
            probe = ids[:1, : min(args.seq, 128)]
            max_diff = (_logits(kin, probe, True) - _logits(hf, probe, False)).abs().max().item()

    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        times, first = bench(models, ids, mode, max(args.warmup, 1), args.iters)
        for name, ts in times.items():
            med = statistics.median(ts)
            tps = tokens / med
            results.setdefault(name, {})[mode] = {
                "median_s": med, "best_s": min(ts), "times_s": ts, "tokens_per_s": tps,
                "gflops_per_s": tps * flops[mode] / 1e9, "first_s": first[name],
            }

    # Shared/virtualised CPUs drift: probe the peak again afterwards and keep the better one.
    peak_after = measure_peak(args.peak_size, args.peak_repeats)
    peak = max(peak_before, peak_after)
    for per_mode in results.values():
        for mode, r in per_mode.items():
            r["mfu"] = r["tokens_per_s"] * flops[mode] / (peak * 1e9)

    # kinetic vs transformers (eager), and compiled vs compiled with --compile
    ratio_of = {k: {mode: results[k][mode]["tokens_per_s"] / results[t][mode]["tokens_per_s"]
                    for mode in MODES} for k, t in pairs}
    best_of = {k: {mode: results[t][mode]["best_s"] / results[k][mode]["best_s"] for mode in MODES}
               for k, t in pairs}
    ratios, best_ratios = ratio_of.get("kinetic", {}), best_of.get("kinetic", {})

    eager = {name: mk for name, mk in models.items() if "compiled" not in name}
    parts, blocks = {}, {}
    if args.breakdown:
        parts = {name: breakdown(m, ids, is_k, args.iters) for name, (m, is_k) in eager.items()}
        hidden = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=gen) * 0.5
        blocks = block_breakdown(eager, cfg.hybrid_override_pattern, hidden, args.iters)

    # ------------------------------------------------------------------ report
    print(f"\nNemotronH speed: preset={args.preset} (no MTP), batch={args.batch} x seq={args.seq} "
          f"= {tokens} tokens, fp32, {threads} torch threads, {platform.processor() or platform.machine()}")
    print(f"params: total {counts['total'] / 1e6:.2f}M, active {counts['active'] / 1e6:.2f}M "
          f"(+embeddings {counts['active_with_embeddings'] / 1e6:.2f}M), "
          f"matmul N {matmul_params(cfg) / 1e6:.2f}M")
    print(f"FLOPs/token: forward {flops['forward'] / 1e6:.2f}M (matmul {flops['matmul'] / 1e6:.2f}M, "
          f"attention {flops['attention'] / 1e6:.2f}M, SSD {flops['ssd'] / 1e6:.2f}M); "
          f"fwd+bwd {flops['fwd+bwd'] / 1e6:.2f}M")
    print(f"peak fp32 matmul ({args.peak_size}x{args.peak_size}, best of {args.peak_repeats} before and "
          f"{args.peak_repeats} after the run): {peak:.1f} GFLOP/s (before {peak_before:.1f}, "
          f"after {peak_after:.1f})")
    if hf is not None:
        kernels = "mamba_ssm" if importlib.util.find_spec("mamba_ssm") else "pure-PyTorch Mamba path"
        print(f"transformers {sys.modules['transformers'].__version__}: {hf.config._attn_implementation} "
              f"attention, {kernels}; max |logit diff| vs kinetic = {max_diff:.2e}")
    print(f"median of {args.iters} iterations after {max(args.warmup, 1)} warm-up; 1-min load average "
          f"{load_before:.2f} before the run (other busy processes skew CPU timings)\n")

    width = max(len(name) for name in results)
    header = (f"{'mode':<9} {'impl':<{width}} {'ms/iter':>9} {'best ms':>9} {'tokens/s':>10} {'GFLOP/s':>9} "
              f"{'MFU':>7} {'ratio':>7} {'best':>7}" + (f" {'first s':>8}" if args.compile else ""))
    print(header)
    print("-" * len(header))
    for mode in MODES:
        for name in results:
            r = results[name][mode]
            ratio = f"{ratio_of[name][mode]:.2f}x" if name in ratio_of else ""
            best = f"{best_of[name][mode]:.2f}x" if name in best_of else ""
            print(f"{mode:<9} {name:<{width}} {r['median_s'] * 1e3:>9.1f} {r['best_s'] * 1e3:>9.1f} "
                  f"{r['tokens_per_s']:>10.1f} {r['gflops_per_s']:>9.1f} {r['mfu'] * 100:>6.1f}% {ratio:>7} "
                  f"{best:>7}" + (f" {r['first_s']:>8.1f}" if args.compile else ""))
    kernels_gain = {}
    if "kinetic torch ops" in results:
        kernels_gain = {mode: results["kinetic"][mode]["tokens_per_s"] / results["kinetic torch ops"][mode]
                        ["tokens_per_s"] for mode in MODES}
        print("\nkinetic with its C kernels over kinetic with torch's operators only (median): "
              + ", ".join(f"{mode} {kernels_gain[mode]:.3f}x" for mode in MODES))
    if ratios:
        print("\nratio = kinetic tokens/s / transformers tokens/s at the median iteration (compiled: over "
              "compiled transformers); best = the same ratio for the fastest iteration of each")
    if parts:
        print(f"\nforward ms per kind of layer (all layers of a kind, module hooks, median of {args.iters})")
        names = list(parts)
        print(f"{'part':<10} " + " ".join(f"{n:>17}" for n in names) + ("   ratio" if hf is not None else ""))
        for key in parts[names[0]]:
            vals = [parts[n][key] for n in names]
            print(f"{key:<10} " + " ".join(f"{v:>17.1f}" for v in vals) + _vs_transformers(parts, key))
    if blocks:
        counts_of = {kind: cfg.hybrid_override_pattern.count(c) for c, kind in BLOCK_KINDS.items()}
        print(f"\nforward+backward ms of one block of each kind (same input, median of {args.iters})")
        names = list(blocks)
        print(f"{'block':<10} {'layers':>6} " + " ".join(f"{n:>17}" for n in names)
              + ("   ratio" if hf is not None else ""))
        for kind in blocks[names[0]]:
            vals = [blocks[n][kind] for n in names]
            print(f"{kind:<10} {counts_of[kind]:>6} " + " ".join(f"{v:>17.1f}" for v in vals)
                  + _vs_transformers(blocks, kind))
    noisy = [f"{name} {mode}" for name, per_mode in results.items() for mode, r in per_mode.items()
             if r["median_s"] > 1.25 * min(r["times_s"])]
    if noisy:
        print(f"warning: median more than 25% above the fastest iteration ({', '.join(noisy)}): "
              "the machine is noisy; rerun or raise --iters")

    report = {
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "tokens": tokens, "iters": args.iters,
        "warmup": args.warmup, "threads": threads, "torch": torch.__version__,
        "transformers": sys.modules["transformers"].__version__ if hf is not None else None,
        "peak_gflops_per_s": peak,
        "peak_before_gflops_per_s": peak_before, "peak_after_gflops_per_s": peak_after,
        "peak_size": args.peak_size, "load_average_before": load_before, "param_counts": counts,
        "matmul_params": matmul_params(cfg), "flops_per_token": flops, "max_logit_diff": max_diff,
        "results": results, "ratio": ratios, "ratio_best": best_ratios, "forward_breakdown_ms": parts,
        "block_fwd_bwd_ms": blocks,
        "ratio_compiled": ratio_of.get("kinetic compiled", {}),
        "ratio_torch_ops": ratio_of.get("kinetic torch ops", {}), "kernels_gain": kernels_gain,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
