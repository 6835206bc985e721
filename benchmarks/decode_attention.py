"""Decode attention alone: one query per head over a long KV cache, up to four ways, in one run
(each the core of an implementation of ``kinetic.ops.cached_attention``; benchmarks/ops.py times the
implementations themselves against the operation's reference):

- ``sdpa``: ``scaled_dot_product_attention(enable_gqa=True)`` on the cache's filled part (the
  ``sdpa.masked`` implementation's decode call; in float32 no CUDA kernel takes grouped heads, and
  the fallback repeats the keys and values per query head);
- ``rows``: the query heads sharing a KV head as that head's rows, one kernel call (the CPU decode
  path, ``sdpa.grouped-decode``; on CUDA one thread block per KV head);
- ``kernel`` (CPU with AVX-512 only, where ``kinetic.kernels.cpu`` can build it): kinetic's C
  decode-attention kernel, one pass over the keys and values (``cpu.c-decode``, the CPU decode path
  when it fits);
- ``split``: split-KV ("flash decoding", ``sdpa.split-kv-decode``, through
  ``kinetic.kernels.sdpa._split_kv_decode``): the keys cut
  into partitions that run as one batched call, merged by their log-sum-exp (CUDA float32 decode
  from ``SPLIT_KV_MIN_KEYS`` cached keys on; on CPU, which decodes by ``rows``, up to 8 parts of at
  least ``SPLIT_KV_BLOCK`` keys, for comparison).

For each: median time per call, memory allocated beyond the inputs (peak), and the largest error
against a float64 reference. Shapes: the tiny preset's attention (4 query / 2 KV heads of 16) and
Nemotron 3 Nano's (32 / 2 of 128).

    python benchmarks/decode_attention.py                                  # CPU, 8K and 128K
    python benchmarks/decode_attention.py --device cuda --json /tmp/attn.json   # up to 1M
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kinetic.infer.memory import PeakTensorMemory
from kinetic.kernels.cpu import decode_attention, decode_attention_available
from kinetic.kernels.sdpa import (
    _CUDA_BACKENDS,
    SPLIT_KV_BLOCK,
    _attention_lse,
    _split_kv_decode,
    _split_kv_partitions,
)

SHAPES = {"tiny": (4, 2, 16), "nano": (32, 2, 128)}  # query heads, KV heads, head dim


def _sdpa(q, k, v):
    if q.is_cuda:
        with torch.nn.attention.sdpa_kernel(_CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _rows(q, k, v):
    b, heads, _, d = q.shape
    out, _ = _attention_lse(q.reshape(b, k.shape[1], heads // k.shape[1], d), k, v, False)
    return out.reshape(b, heads, 1, d)


def _split(q, k, v):
    if q.is_cuda:  # as decoding does
        partitions = _split_kv_partitions(q, k.shape[1], k.shape[2])
    else:  # the CPU decodes with one call ("rows"); here split anyway, to compare
        partitions = max(1, min(8, k.shape[2] // SPLIT_KV_BLOCK))
    return _split_kv_decode(q, k, v, partitions)


VARIANTS = {"sdpa": _sdpa, "rows": _rows, "kernel": decode_attention, "split": _split}


def variants(device: torch.device, dtype: torch.dtype) -> dict:
    """The ways that run here: the C kernel on CPU float32 where it could be built."""
    kernel = decode_attention_available(device, dtype)
    return {name: fn for name, fn in VARIANTS.items() if name != "kernel" or kernel}


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float64 attention of one query per head, each KV head's queries as the rows of one matmul:
    no copy of the keys per query head (SDPA's enable_gqa in float64 needs 32 GiB for nano at 1M)."""
    b, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.double().view(b, kv_heads, heads // kv_heads, dim)
    scores = qg @ k.double().transpose(-1, -2) / dim**0.5  # (b, kv_heads, group, n)
    return (scores.softmax(-1) @ v.double()).view(b, heads, 1, dim)


def _time(fn, args: tuple, device: torch.device, repeats: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def run(shapes: list[str], contexts: list[int], device: torch.device, dtype: torch.dtype,
        repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        heads, kv_heads, dim = SHAPES[shape]
        for n in contexts:
            g = torch.Generator(device=device).manual_seed(n)
            kbuf = torch.randn(1, kv_heads, n + 64, dim, device=device, dtype=dtype, generator=g)
            vbuf = torch.randn_like(kbuf)
            k, v = kbuf[:, :, :n], vbuf[:, :, :n]  # a cache's filled part: a view of its buffer
            q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype, generator=g)
            ref = _reference(q, k, v)
            kv_mib = 2 * k.numel() * k.element_size() / 2**20
            for name, fn in variants(device, dtype).items():
                with PeakTensorMemory(device) as mem:
                    out = fn(q, k, v)
                err = (out.double() - ref).abs().max().item()
                seconds = _time(fn, (q, k, v), device, repeats)
                rows.append({"shape": shape, "context": n, "variant": name, "kv_mib": kv_mib,
                             "ms": 1e3 * seconds, "extra_mib": None if mem.peak_bytes is None
                             else mem.peak_bytes / 2**20, "max_err": err})
                print(f"{shape:>5} {n:>10,} {name:>6} {kv_mib:>9.1f} {1e3 * seconds:>9.3f} "
                      f"{'' if mem.peak_bytes is None else f'{mem.peak_bytes / 2**20:,.1f}':>10} "
                      f"{err:>9.1e}", flush=True)
            del kbuf, vbuf, k, v, ref
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "nano"])
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="cached tokens (default 8K 128K, and 1M on CUDA)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    contexts = args.contexts or ([8192, 131072, 1048576] if device.type == "cuda" else [8192, 131072])
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"decode attention, one query per head: {name}, {args.dtype}, batch 1, torch {torch.__version__}\n")
    print(f"{'shape':>5} {'context':>10} {'way':>6} {'KV MiB':>9} {'ms':>9} {'extra MiB':>10} {'max err':>9}")
    rows = run(args.shapes, contexts, device, getattr(torch, args.dtype), args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": args.dtype, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
