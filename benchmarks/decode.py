"""Decode speed: kinetic's cached decode vs transformers' greedy ``generate`` on the same weights, and
per-token decode latency as the context grows (the hybrid's Mamba layers keep a constant state; only
its few attention layers keep a growing KV cache).

Long contexts are prefilled in chunks through ``InferenceCache`` (each chunk continues the Mamba
states and appends to the KV caches), so prefill activation memory is bounded by the chunk.
MTP speculative decoding is not measured here yet.

    python benchmarks/decode.py                                   # tiny preset, contexts 1K..128K
    python benchmarks/decode.py --contexts 1024 8192 --json /tmp/decode.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time

import torch

import kinetic
from kinetic.model import InferenceCache


@torch.no_grad()
def step_latency(model, context: int, steps: int, chunk: int, seed: int = 0) -> dict:
    """Prefill ``context`` random tokens in chunks, then time ``steps`` single-token decode steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=g)
    cache = InferenceCache()
    t0 = time.perf_counter()
    for start in range(0, context, chunk):
        logits = model(ids[:, start:start + chunk], cache, return_mtp=False, logits_to_keep=1).logits
    prefill = time.perf_counter() - t0
    token = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        token = model(token, cache, return_mtp=False).logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    return {"context": context, "prefill_s": prefill, "prefill_tokens_per_s": context / prefill,
            "step_ms": 1e3 * statistics.median(times), "cache_mib": cache.nbytes() / 2**20}


@torch.no_grad()
def generate_speed(model, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of greedy generation: kinetic vs transformers (same weights), best of ``repeats``."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=gen)
    out = {"prompt": prompt_len, "new_tokens": new_tokens}

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    kin_s = best(lambda: model.generate(ids, max_new_tokens=new_tokens, eos_token_id=None))
    out["kinetic_tokens_per_s"] = new_tokens / kin_s
    if importlib.util.find_spec("transformers") is None:
        return out
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    same = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    out["identical_tokens"] = same.tolist() == model.generate(ids, max_new_tokens=new_tokens,
                                                              eos_token_id=None).tolist()
    hf_s = best(lambda: hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=0))
    out["transformers_tokens_per_s"] = new_tokens / hf_s
    out["ratio"] = hf_s / kin_s
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 65536, 131072])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk length")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    # Δt clamped at time_step_min, as transformers' prefill does, so both decode the same function
    base = kinetic.preset(args.preset)
    config = base.replace(time_step_limit=(base.time_step_min, float("inf")))
    model = kinetic.NemotronHForCausalLM(config).eval()
    gen = generate_speed(model, 32, args.new_tokens, repeats=3)
    rows = [step_latency(model, n, args.steps, args.chunk) for n in args.contexts]
    print(f"\nkinetic decode: preset {args.preset} ({model.config.hybrid_override_pattern}), fp32, "
          f"{torch.get_num_threads()} threads, batch 1\n")
    line = (f"greedy generate, 32-token prompt + {gen['new_tokens']} tokens: kinetic "
            f"{gen['kinetic_tokens_per_s']:.1f} tok/s")
    if "ratio" in gen:
        line += (f", transformers {gen['transformers_tokens_per_s']:.1f} tok/s -> {gen['ratio']:.2f}x; "
                 f"identical tokens: {gen['identical_tokens']}")
    print(line + "\n")
    print(f"{'context':>9} {'prefill tok/s':>14} {'decode ms/token':>16} {'cache MiB':>10} {'vs first':>9}")
    for r in rows:
        print(f"{r['context']:>9,} {r['prefill_tokens_per_s']:>14,.0f} {r['step_ms']:>16.2f} "
              f"{r['cache_mib']:>10.1f} {r['step_ms'] / rows[0]['step_ms']:>8.2f}x")
    report = {"preset": args.preset, "generate": gen, "latency": rows, "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
