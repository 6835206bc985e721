"""Long-context prefill: a prompt of N tokens (1M by default) through the tiny hybrid preset in
chunks, with the cache budget printed before it runs and the measured peak memory compared to
budget + weights afterwards (target: within 10%). Then a few decode steps at that context.

The peak is of tensor memory: weights, cache and activations. On CUDA it is
``torch.cuda.max_memory_allocated``; the CUDA libraries' workspaces (cuBLAS keeps 32 MiB per stream
on Hopper) are a fixed cost of the process, not of the context, so they are measured after a short
warm-up forward and reported separately. On CPU the same quantity comes from the profiler's record of
every allocation (:class:`kinetic.infer.memory.PeakTensorMemory`), in a second run of the prefill so
that the first, timed run is not slowed by the profiler; the first run also reports the growth of the
process's peak resident set, an upper bound that also counts the C allocator's slack. On CUDA the
prefill's and the decode steps' peaks are also reported apart; ``--cuda-graph`` decodes as
``generate(compile=True)`` does, through the decoder's compiled step (CUDA graphs; the decode peak then
also counts what the capture allocates for itself, such as its streams' library workspaces).

    python benchmarks/long_context.py --device cuda --dtype bfloat16              # 1M tokens
    python benchmarks/long_context.py --device cuda --cuda-graph                  # graph decode
    python benchmarks/long_context.py --tokens 131072 --chunk 2048                 # CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

import kinetic
from kinetic.infer.cache import InferenceCache, cache_budget, format_budget
from kinetic.infer.memory import PeakTensorMemory


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prefill_and_decode(model, ids: torch.Tensor, chunk: int, decode_steps: int, device: torch.device,
                        desc: str, phase_peaks: dict | None = None, cuda_graph: bool = False):
    """Prefill ``ids`` in chunks of ``chunk`` tokens, then time ``decode_steps`` greedy steps: through
    an InferenceCache, or with ``cuda_graph`` through the decoder with its compiled step (Inductor's
    reduce-overhead mode: CUDA graphs), as ``generate(compile=True)`` runs. Returns the cache, the
    prefill seconds and each step's seconds."""
    cuda = device.type == "cuda"
    tokens = ids.shape[1]
    if cuda_graph:
        from kinetic.infer.decoder import Decoder
        from kinetic.infer.execution import Compiled
        from kinetic.infer.sampling import SamplingParams

        decoder = Decoder(model, max_batch=1, prefill_chunk=chunk, execution=Compiled())
        decoder.add(ids[0].tolist(), SamplingParams(max_new_tokens=decode_steps + 1, temperature=0))
        cache = decoder.cache

        def prefill_chunk(start):
            decoder.step()

        def step(token):
            decoder.step()
            return token
    else:
        cache = InferenceCache()
        cache.reserve(tokens + decode_steps)
        logits = None

        def prefill_chunk(start):
            nonlocal logits
            part = ids[:, start:start + chunk].to(device)
            logits = model(part, cache, return_mtp=False, logits_to_keep=1).logits

        def step(token):
            return model(token, cache, return_mtp=False).logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for start in tqdm(range(0, tokens, chunk), desc=desc, unit="chunk"):
        prefill_chunk(start)
    if cuda:
        torch.cuda.synchronize(device)
    prefill_s = time.perf_counter() - t0
    if phase_peaks is not None:  # CUDA: the prefill's peak, then count the decode steps' on their own
        phase_peaks["prefill"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    token = None if cuda_graph else logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(decode_steps):
        t = time.perf_counter()
        token = step(token)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    if phase_peaks is not None:
        phase_peaks["decode"] = torch.cuda.max_memory_allocated(device)
    return cache, prefill_s, times


@torch.no_grad()
def run(tokens: int, chunk: int, device: torch.device, dtype: torch.dtype, preset: str,
        decode_steps: int, cuda_graph: bool = False) -> dict:
    config = kinetic.preset(preset).replace(max_position_embeddings=max(tokens + decode_steps + 1, 8192))
    cuda = device.type == "cuda"
    rss0 = _rss_bytes()
    base = torch.cuda.memory_allocated(device) if cuda else 0
    torch.manual_seed(0)
    model = kinetic.NemotronHForCausalLM(config).to(device=device, dtype=dtype).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # a short forward allocates the libraries' workspaces (fixed per process: cuBLAS on CUDA; on CPU
    # the thread pools and the BLAS/oneDNN buffers that the first call of each kernel sets up)
    model(torch.zeros(1, 16, dtype=torch.long, device=device), InferenceCache(), return_mtp=False)
    if cuda:
        torch.cuda.synchronize(device)
        library = torch.cuda.memory_allocated(device) - base - weights
    else:
        library = max(_rss_bytes() - rss0 - weights, 0)
    budget = cache_budget(config, tokens + decode_steps, dtype=dtype)
    print(format_budget(budget, weights))
    ids = torch.randint(3, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    expected = budget["total"] + weights
    mib = 2**20
    phases = None
    if cuda:  # one run, timed and measured by the caching allocator, prefill and decode apart
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        cuda_peaks = {}
        cache, prefill_s, times = _prefill_and_decode(model, ids, chunk, decode_steps, device,
                                                      f"prefill {tokens:,} tokens", cuda_peaks, cuda_graph)
        phases = {name: value - start for name, value in cuda_peaks.items()}
        mem = SimpleNamespace(peak_bytes=max(phases.values()))
        rss_growth = None
    else:  # timed run (its peak RSS is an upper bound), then a profiled run counting tensors
        cache, prefill_s, times = _prefill_and_decode(model, ids, chunk, decode_steps, device,
                                                      f"prefill {tokens:,} tokens")
        rss_growth = _rss_bytes() - rss0 - library
        del cache
        with PeakTensorMemory(device) as mem:
            cache, _, _ = _prefill_and_decode(model, ids, chunk, decode_steps, device,
                                              "again, counting tensor memory")
    # the peak of tensors allocated beyond those alive before (weights, workspaces), plus the weights
    peak = None if mem.peak_bytes is None else mem.peak_bytes + weights
    out = {"tokens": tokens, "chunk": chunk, "preset": preset, "dtype": str(dtype), "device": str(device),
           "cuda_graph": cuda_graph,
           "budget_bytes": budget["total"], "weights_bytes": weights, "peak_bytes": peak,
           "rss_growth_bytes": rss_growth, "library_workspace_bytes": library,
           "cache_bytes": cache.nbytes(), "peak_over_budget": None if peak is None else peak / expected - 1,
           "rss_over_budget": None if rss_growth is None else rss_growth / expected - 1,
           "prefill_s": prefill_s, "prefill_tokens_per_s": tokens / prefill_s,
           "decode_ms": 1e3 * statistics.median(times) if times else None,
           "peak_prefill_bytes": None if phases is None else phases["prefill"] + weights,
           "peak_decode_bytes": None if phases is None else phases["decode"] + weights}
    print(f"prefill {tokens:,} tokens in {prefill_s:.1f} s ({out['prefill_tokens_per_s']:,.0f} tok/s); "
          f"decode at that context {out['decode_ms']:.2f} ms/token" + (" (CUDA graph)" if cuda_graph else ""))
    print(f"cache held {cache.nbytes() / mib:,.1f} MiB (budget {budget['total'] / mib:,.1f} MiB); "
          f"budget + weights {expected / mib:,.1f} MiB")
    if peak is not None:
        print(f"peak tensor memory (weights, cache, activations) {peak / mib:,.1f} MiB -> "
              f"{out['peak_over_budget']:+.1%} over budget + weights (target within 10%)")
        if phases is not None:
            print(f"  of which: prefill {out['peak_prefill_bytes'] / mib:,.1f} MiB, decode steps "
                  f"{out['peak_decode_bytes'] / mib:,.1f} MiB")
        excess = peak - expected  # one chunk's activations: proportional to the chunk, not the context
        if excess > 0.1 * expected and (phases is None or phases["prefill"] >= phases["decode"]):
            per_token = excess / min(chunk, tokens)
            print(f"  activations ~{per_token / 1024:,.1f} KiB per chunk token: a chunk of at most "
                  f"{int(0.1 * expected / per_token):,} tokens keeps this context within 10%")
    if rss_growth is not None:
        print(f"peak resident-set growth {rss_growth / mib:,.1f} MiB -> {out['rss_over_budget']:+.1%} "
              f"(an upper bound: also the C allocator's slack)")
    print(f"plus {library / mib:,.1f} MiB of "
          + ("CUDA library workspace" if cuda else "process set-up (first forward, resident set)"))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA: decode with the decoder's compiled step (CUDA graphs), as "
                        "generate(compile=True) does")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        parser.error(f"--cuda-graph needs --device cuda, got --device {args.device}")
    out = run(args.tokens, args.chunk, device, getattr(torch, args.dtype), args.preset, args.decode_steps,
              args.cuda_graph)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
