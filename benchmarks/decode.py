"""Decode speed, in one run on one machine:

1. plain greedy decode: kinetic's cached ``generate`` -- eager, and on its fast path (CUDA graphs on
   CUDA, ``torch.compile`` on CPU) -- vs transformers' ``generate`` on the same (random,
   tiny-preset) weights, checking the tokens are identical;
2. MTP speculative decoding vs plain decoding on a checkpoint trained with MTP (the quickstart
   checkpoint when it exists, else a tiny MTP model trained here on a synthetic Markov language),
   for several draft lengths: tokens/s, speed-up, acceptance rate and mean accepted length, and a
   check that the greedy tokens are identical; eager, and with ``--compile`` the plain decode on its
   fast path too (the decoder's compiled step); then what an eager round costs, phase by
   phase, in plain decode steps -- the speed-up is the mean accepted length over that cost, and
   the verification pass alone bounds it (meaningful on CPU, where the phases are timed exactly);
3. per-token decode latency as the context grows (1K .. 128K by default): long prompts are prefilled
   in chunks through ``InferenceCache`` (KV buffers reserved once), then single-token steps are timed,
   in blocks that take turns across the contexts (so drift of a shared machine hits all alike).
   The hybrid's Mamba layers keep a constant state; only its few attention layers read a growing
   KV cache. On a CPU where kinetic's C decode attention runs (float32, AVX-512;
   ``kinetic.kernels.cpu``) each block of steps also runs with torch's SDPA instead, on the same
   caches, and both columns are printed.

    python benchmarks/decode.py                                     # CPU, fp32
    python benchmarks/decode.py --device cuda --dtype bfloat16 --json /tmp/decode.json
    python benchmarks/decode.py --sections speculative --draft-tokens 1 3 7
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kinetic
from kinetic.infer.cache import InferenceCache
from kinetic.infer.generate import speculative_generate
from kinetic.kernels.cpu import decode_attention_available, torch_only

QUICKSTART = Path("runs/quickstart/pretrain")
PROMPTS = ["The Congress shall", "def parse_args(", "The state of the Union is",
           "class Parser:\n    def __init__(self", "We the People of the United States, in Order to"]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


# ---------------------------------------------------------------------- 1. vs transformers
@torch.no_grad()
def generate_speed(model, prompt_len: int, new_tokens: int, repeats: int, device) -> dict:
    """Tokens/s of greedy generation: kinetic vs transformers (same weights), best of ``repeats``."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=gen).to(device)
    out = {"prompt": prompt_len, "new_tokens": new_tokens}
    # the fast path: the decoder's compiled step (Inductor; on CUDA in reduce-overhead mode: CUDA graphs)
    fast = dict(compile=True)
    kin_s = _best(lambda: model.generate(ids, max_new_tokens=new_tokens, eos_token_id=None, **fast),
                  repeats, device)  # the warm-up call compiles / captures
    out["kinetic_fast_path"] = "torch.compile (CUDA graphs)" if ids.is_cuda else "torch.compile"
    out["kinetic_tokens_per_s"] = new_tokens / kin_s
    eager_s = _best(lambda: model.generate(ids, max_new_tokens=new_tokens, eos_token_id=None), repeats,
                    device)
    out["kinetic_eager_tokens_per_s"] = new_tokens / eager_s
    if importlib.util.find_spec("transformers") is None:
        return out
    import transformers

    transformers.logging.set_verbosity_error()
    out["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=next(model.parameters()).dtype)
    hf = hf.to(device).eval()

    def hf_generate():
        return hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    out["identical_tokens"] = hf_generate().tolist() == model.generate(
        ids, max_new_tokens=new_tokens, eos_token_id=None, **fast).tolist()
    hf_s = _best(hf_generate, repeats, device)
    out["transformers_tokens_per_s"] = new_tokens / hf_s
    out["ratio"] = hf_s / kin_s
    out["eager_ratio"] = hf_s / eager_s
    return out


# ---------------------------------------------------------------------- 2. speculative
def trained_checkpoint(path: Path | None, device, dtype, steps: int = 300, pattern: str | None = None):
    """(model, prompts as id lists, description): the given/quickstart checkpoint, else a tiny MTP
    model (block pattern ``pattern``, default the preset's) trained here for ``steps`` steps on a
    synthetic Markov language."""
    if path is None and pattern is None and (QUICKSTART / "checkpoints" / "latest").exists():
        path = QUICKSTART
    if path is not None:
        from kinetic.data.tokenizer import TOKENIZER_FILE, encode, load_tokenizer
        from kinetic.eval import resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        model = kinetic.from_pretrained(ckpt, dtype=dtype, device=device).eval()
        if model.mtp is None:
            raise SystemExit(f"{ckpt} has no MTP layers: speculative decoding needs them")
        tok = load_tokenizer(ckpt / TOKENIZER_FILE)
        return model, [encode(tok, p) for p in PROMPTS], str(ckpt)
    from kinetic.train.sources import SyntheticSource

    torch.manual_seed(0)
    config = kinetic.preset("tiny")
    if pattern:
        config = config.replace(hybrid_override_pattern=pattern)
    model = kinetic.NemotronHForCausalLM(config).to(device)
    source = SyntheticSource(config.vocab_size, 128, 16, branching=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        batch = source.next_batch().to(device)
        out = model(batch[:, :-1], labels=batch)
        loss = out.loss + 0.3 * sum(out.mtp_losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompts = [row[:24].tolist() for row in source.next_batch()[:len(PROMPTS)]]
    return model.to(device=device, dtype=dtype).eval(), prompts, (
        f"tiny preset ({config.hybrid_override_pattern} + MTP {config.mtp_hybrid_override_pattern}) "
        f"trained here {steps} steps on a 2-successor Markov language")


@torch.no_grad()
def speculative_speed(model, prompts, new_tokens: int, draft_lengths, repeats: int, device,
                      compiled: bool = False) -> dict:
    """Greedy tokens/s over all prompts, one at a time: plain cached decode vs MTP speculative
    decoding (both eager). ``compiled`` adds the plain decode's compiled step (CUDA graphs on CUDA;
    compiling is done by a warm-up call, not timed)."""

    def plain(compile: bool = False):
        return [model.generate(torch.tensor([p], device=device), max_new_tokens=new_tokens,
                               eos_token_id=None, compile=compile)[0, len(p):].tolist()
                for p in prompts]

    ref = plain()
    plain_s = _best(plain, repeats, device)
    total = new_tokens * len(prompts)
    compiled_s = _best(lambda: plain(True), repeats, device) if compiled else None
    graph_tps = total / compiled_s if compiled and device.type == "cuda" else None
    rows = []

    def spec(k: int, stats: list):
        stats.clear()
        outs = []
        for p in prompts:
            toks, st = speculative_generate(model, p, new_tokens, draft_tokens=k)
            outs.append(toks)
            stats.append(st)
        return outs

    for k in draft_lengths:
        stats: list = []
        same = spec(k, stats) == ref
        spec_s = _best(lambda k=k, stats=stats: spec(k, stats), repeats, device)
        drafted = sum(s.drafted for s in stats)
        accepted = sum(s.accepted for s in stats)
        rounds = sum(s.rounds for s in stats)
        emitted = sum(s.emitted for s in stats)
        row = {"draft_tokens": k, "tokens_per_s": total / spec_s, "speedup": plain_s / spec_s,
               "acceptance_rate": accepted / max(drafted, 1),
               "mean_accepted_length": emitted / max(rounds, 1), "identical_tokens": same}
        # a round's cost in plain decode steps (so speed-up = mean accepted length / round), split
        # into its phases in the proportions the last run timed them (the best run is not known)
        row["round_steps"] = (spec_s / max(rounds, 1)) / (plain_s / total)
        phases = {ph: sum(getattr(s, f"{ph}_s") for s in stats) for ph in ("verify", "draft", "commit")}
        for ph, t in phases.items():
            row[f"{ph}_steps"] = row["round_steps"] * t / max(sum(phases.values()), 1e-12)
        rows.append(row)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "plain_tokens_per_s": total / plain_s,
            "plain_cuda_graph_tokens_per_s": graph_tps,
            "plain_compiled_tokens_per_s": total / compiled_s if compiled else None, "rows": rows}


# ---------------------------------------------------------------------- 3. latency vs context
@torch.no_grad()
def step_latency(model, context: int, steps: int, chunk: int, device, seed: int = 0) -> dict:
    """Prefill ``context`` random tokens in chunks, then time ``steps`` single-token decode steps."""
    return step_latencies(model, [context], steps, chunk, device, seed)[0]


def attention_ways(device, dtype=torch.float32) -> list[str]:
    """How decode steps attend here: ``kernel`` (kinetic's C decode attention, the CPU float32 default
    where it can be built) and ``torch`` (SDPA), or ``torch`` alone."""
    return ["kernel", "torch"] if decode_attention_available(device, dtype) else ["torch"]


@torch.no_grad()
def step_latencies(model, contexts: list[int], steps: int, chunk: int, device, seed: int = 0,
                   block: int = 8, ways: list[str] | None = None) -> list[dict]:
    """Prefill one cache per context (random tokens, in chunks), then time ``steps`` single-token
    decode steps per context, in blocks of ``block`` steps that take turns across the contexts, so a
    machine that speeds up or slows down during the run shifts every context alike; each row reports
    the median step. With ``ways`` (see :func:`attention_ways`) every block runs once per way on the
    same cache, the first way's steps reported as ``step_ms`` and each other's as ``step_ms_<way>``."""
    ways = ways or ["default"]
    g = torch.Generator().manual_seed(seed)
    runs = []
    for context in contexts:
        ids = torch.randint(3, model.config.vocab_size, (1, context), generator=g).to(device)
        cache = InferenceCache()
        cache.reserve(context + len(ways) * steps + 1)
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, context, chunk):
            logits = model(ids[:, start:start + chunk], cache, return_mtp=False, logits_to_keep=1).logits
        _sync(device)
        runs.append({"context": context, "prefill_s": time.perf_counter() - t0, "cache": cache,
                     "token": logits[:, -1].argmax(-1, keepdim=True), "times": {w: [] for w in ways}})
    for first in range(0, steps, block):
        for run in runs:
            for way in ways:
                with torch_only() if way == "torch" else contextlib.nullcontext():
                    for _ in range(min(block, steps - first)):
                        _sync(device)
                        t = time.perf_counter()
                        logits = model(run["token"], run["cache"], return_mtp=False).logits
                        run["token"] = logits[:, -1].argmax(-1, keepdim=True)
                        _sync(device)
                        run["times"][way].append(time.perf_counter() - t)
    rows = []
    for r in runs:
        times = r["times"]
        row = {"context": r["context"], "prefill_s": r["prefill_s"],
               "prefill_tokens_per_s": r["context"] / r["prefill_s"],
               "step_ms": 1e3 * statistics.median(times[ways[0]]), "steps": len(times[ways[0]]),
               "cache_mib": r["cache"].nbytes() / 2**20}
        if ways != ["default"]:
            row["attention"] = ways[0]
        for way in ways[1:]:
            row[f"step_ms_{way}"] = 1e3 * statistics.median(times[way])
        rows.append(row)
    return rows


def print_speculative(spec: dict, device: torch.device) -> None:
    """Section 2's tables: speed per draft length, then each eager round's cost by phase."""
    what = spec["checkpoint"]
    graph_note = ("" if spec["plain_cuda_graph_tokens_per_s"] is None else
                  f" (with CUDA graphs {spec['plain_cuda_graph_tokens_per_s']:.1f} tok/s)")
    compiled_tps = spec["plain_compiled_tokens_per_s"]
    fast = "CUDA-graph" if device.type == "cuda" else "compiled"
    compiled_note = "" if compiled_tps is None else f"; plain {fast} decode {compiled_tps:.1f} tok/s"
    print(f"2. MTP speculative decoding, greedy, {what}\n   {spec['prompts']} prompts x "
          f"{spec['new_tokens']} tokens; plain eager decode {spec['plain_tokens_per_s']:.1f} tok/s"
          f"{graph_note}{compiled_note}\n")
    print(f"{'draft k':>8} {'tok/s':>8} {'vs plain':>9} {'accept rate':>12} {'mean accepted len':>18} "
          f"{'identical':>10}")
    for r in spec["rows"]:
        print(f"{r['draft_tokens']:>8} {r['tokens_per_s']:>8.1f} {r['speedup']:>8.2f}x "
              f"{r['acceptance_rate']:>11.0%} {r['mean_accepted_length']:>18.2f} "
              f"{str(r['identical_tokens']):>10}")
    print("\n   where an eager round's time goes, in plain decode steps (speed-up = mean accepted length /"
          "\n   round cost; the ceiling with free drafting and committing = mean accepted length / verify)"
          + ("\n   (on CUDA the split is approximate: queued GPU work is counted in the phase that waits)"
             if device.type == "cuda" else "") + "\n")
    print(f"{'draft k':>8} {'verify':>8} {'draft':>8} {'commit':>8} {'round':>8} {'ceiling':>8}")
    for r in spec["rows"]:
        print(f"{r['draft_tokens']:>8} {r['verify_steps']:>8.2f} {r['draft_steps']:>8.2f} "
              f"{r['commit_steps']:>8.2f} {r['round_steps']:>8.2f} "
              f"{r['mean_accepted_length'] / r['verify_steps']:>7.2f}x")
    print()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["transformers", "speculative", "latency"],
                        choices=["transformers", "speculative", "latency"])
    parser.add_argument("--preset", default="tiny", help="random model of sections 1 and 3")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="MTP checkpoint for section 2 (default: the quickstart run, if any)")
    parser.add_argument("--train-pattern", default=None,
                        help="section 2 on a tiny model with this block pattern trained here (e.g. a deep "
                        "one, to see how the speed-up grows as MTP becomes a smaller share of the work)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 65536, 131072])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk length")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3, 5, 7])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="section 2 also on the fast paths: torch.compile on CPU (compiles per draft "
                        "length), CUDA graphs on CUDA")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    # Δt clamped at time_step_min, as transformers' prefill does, so both decode the same function
    base = kinetic.preset(args.preset)
    config = base.replace(time_step_limit=(base.time_step_min, float("inf")))
    model = kinetic.NemotronHForCausalLM(config).to(device=device, dtype=dtype).eval()
    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"\nkinetic decode benchmark: {where}, {args.dtype}, batch 1, torch {torch.__version__}\n")
    report = {"device": where, "dtype": args.dtype, "torch": torch.__version__}

    if "transformers" in args.sections:
        gen = generate_speed(model, 32, args.new_tokens, args.repeats, device)
        report["generate"] = gen
        print(f"1. greedy generate, random {args.preset} preset ({config.hybrid_override_pattern}), "
              f"32-token prompt + {gen['new_tokens']} tokens\n")
        hf = gen.get("transformers_tokens_per_s")
        for name, tps in ((f"kinetic, {gen['kinetic_fast_path']}", gen["kinetic_tokens_per_s"]),
                          ("kinetic, eager", gen["kinetic_eager_tokens_per_s"]), ("transformers", hf)):
            if tps is not None:
                vs = f"{tps / hf:>8.2f}x" if hf else ""
                print(f"   {name:<28} {tps:>8.1f} tok/s {vs}")
        if hf:
            print(f"   identical tokens: {gen['identical_tokens']}")
        print()

    if "speculative" in args.sections:
        trained, prompts, what = trained_checkpoint(args.checkpoint, device, dtype,
                                                    pattern=args.train_pattern)
        spec = speculative_speed(trained, prompts, args.new_tokens, args.draft_tokens, args.repeats, device,
                                 compiled=args.compile)
        spec["checkpoint"] = what
        report["speculative"] = spec
        print_speculative(spec, device)

    if "latency" in args.sections:
        ways = attention_ways(device, dtype)
        rows = step_latencies(model, args.contexts, args.steps, args.chunk, device, ways=ways)
        report["latency"] = rows
        print(f"3. decode latency vs context, random {args.preset} preset, prefill chunk {args.chunk}")
        if len(ways) > 1:
            print("   decode steps with kinetic's C decode attention (the default here) and, interleaved on "
                  "the same caches, with torch's SDPA")
        print()
        keys = ["step_ms"] + [f"step_ms_{w}" for w in ways[1:]]
        names = [ways[0] if len(ways) > 1 else "decode", *ways[1:]]
        print(f"{'context':>9} {'prefill tok/s':>14} {'cache MiB':>10}"
              + "".join(f" {n + ' ms/token':>18} {'vs first':>9}" for n in names))
        for r in rows:
            print(f"{r['context']:>9,} {r['prefill_tokens_per_s']:>14,.0f} {r['cache_mib']:>10.1f}"
                  + "".join(f" {r[k]:>18.2f} {r[k] / rows[0][k]:>8.2f}x" for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
