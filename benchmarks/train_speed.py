"""Training throughput of the kinetic trainer: tokens/s and model FLOPs utilization (MFU) against
the machine's measured fp32 matmul peak, for a preset (default `small`, MTP included).

Each row runs real optimizer steps of kinetic.train.Trainer (AdamW, MTP loss, MoE balancing,
clipping) on synthetic tokens, after warm-up steps that are not timed. FLOPs per token come from
kinetic.train.flops (the same model benchmarks/model_speed.py uses), counting the MTP depths.

    python benchmarks/train_speed.py                         # small, seq 512, micro-batch 4
    python benchmarks/train_speed.py --preset tiny --steps 5 --json /tmp/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from kinetic.train import Trainer
from kinetic.train.config import from_dict
from kinetic.train.flops import flops_per_token, measure_peak


def run(preset: str, seq: int, micro_batch: int, grad_accum: int, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict({"model": {"preset": preset}, "data": {"seq_len": seq},
                         "train": {"steps": steps + warmup, "micro_batch": micro_batch,
                                   "grad_accum": grad_accum},
                         "run": {"out_dir": out, "progress": False, "save_every": 0, "eval_every": 0}})
        trainer = Trainer(cfg)
        trainer.model.train()
        for _ in range(warmup):
            trainer.train_step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        config = trainer.model.config
        return {"preset": preset, "seq": seq, "micro_batch": micro_batch, "grad_accum": grad_accum,
                "tokens_per_step": trainer.tokens_per_step, "step_s": statistics.median(times),
                "best_step_s": min(times), "flops_per_token": flops_per_token(config, seq, True)["fwd+bwd"],
                "params": config.param_counts()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    peak_before = measure_peak()
    r = run(args.preset, args.seq, args.micro_batch, args.grad_accum, args.steps, args.warmup)
    peak = max(peak_before, measure_peak())
    tps = r["tokens_per_step"] / r["step_s"]
    r.update(tokens_per_s=tps, peak_gflops=peak, mfu=tps * r["flops_per_token"] / (peak * 1e9),
             threads=torch.get_num_threads(), torch=torch.__version__)
    p = r["params"]
    print(f"\nkinetic training speed: preset {r['preset']} ({p['total'] / 1e6:.2f}M params + "
          f"{p['mtp'] / 1e6:.2f}M MTP, {p['active'] / 1e6:.2f}M active), seq {r['seq']}, "
          f"{r['tokens_per_step']} tokens/step, fp32, {r['threads']} threads")
    print(f"peak fp32 matmul {peak:.1f} GFLOP/s; FLOPs/token (fwd+bwd, MTP included) "
          f"{r['flops_per_token'] / 1e6:.1f}M; median of {args.steps} steps after {args.warmup} warm-up\n")
    print(f"{'step ms':>9} {'best ms':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'MFU':>7}")
    print(f"{r['step_s'] * 1e3:>9.1f} {r['best_step_s'] * 1e3:>9.1f} {tps:>10.1f} "
          f"{tps * r['flops_per_token'] / 1e9:>9.1f} {r['mfu'] * 100:>6.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
