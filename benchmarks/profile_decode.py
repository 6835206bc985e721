"""Profile single-token decode steps with torch.profiler: the operators that take the time (device
time on CUDA, CPU time otherwise) and how many kernels/operators one step launches.

    python benchmarks/profile_decode.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import kinetic
from kinetic.infer.cache import InferenceCache


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = kinetic.NemotronHForCausalLM(kinetic.preset(args.preset)).to(device=device, dtype=dtype).eval()
    cache = InferenceCache()
    cache.reserve(args.context + 2 * args.steps + 1)
    ids = torch.randint(3, model.config.vocab_size, (1, args.context), device=device)
    token = model(ids, cache, return_mtp=False, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(args.steps):  # warm-up
        token = model(token, cache, return_mtp=False).logits[:, -1].argmax(-1, keepdim=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            token = model(token, cache, return_mtp=False).logits[:, -1].argmax(-1, keepdim=True)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows))
    if cuda:
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    ops = sum(e.count for e in events if not e.key.startswith("cuda") and e.cpu_parent is None) / args.steps
    print(f"{args.preset} {args.dtype} on {device}: ~{ops:.0f} top-level operator calls per decode step")


if __name__ == "__main__":
    main()
