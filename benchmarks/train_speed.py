"""Training throughput of the kinetic trainer: tokens/s and model FLOPs utilization (MFU) against
the machine's measured fp32 matmul peak, for a preset (default `small`, MTP included).

Each row runs real optimizer steps of kinetic.train.Trainer (AdamW, MTP loss, MoE balancing,
clipping) on synthetic tokens, after warm-up steps that are not timed. FLOPs per token come from
kinetic.train.flops (the same model benchmarks/model_speed.py uses), counting the MTP depths.
``--compile`` adds a trainer with ``train.compile = true`` in the same process (same seed and
data); the timed steps of the two alternate, so a machine that speeds up or slows down shifts both,
and the table shows the compile time and after how many steps compiling has paid for itself.

    python benchmarks/train_speed.py                         # small, seq 512, micro-batch 4
    python benchmarks/train_speed.py --preset tiny --steps 5 --json /tmp/train_speed.json
    python benchmarks/train_speed.py --recipe configs/quickstart.toml --compile   # its model
    python benchmarks/train_speed.py --device cuda           # on a GPU, MFU against its fp32 peak
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tomllib

import torch

from kinetic.train import Trainer
from kinetic.train.config import from_dict
from kinetic.train.flops import flops_per_token, measure_peak


def run(preset: str, seq: int, micro_batch: int, grad_accum: int, steps: int, warmup: int,
        compile: bool = False, model: dict | None = None, device: str = "cpu") -> dict:
    """Median step time of each trainer ("eager", and "compiled" with ``compile``); ``model`` is
    a recipe's [model] section (default: the preset)."""
    modes = ["eager", "compiled"] if compile else ["eager"]
    with tempfile.TemporaryDirectory() as out:
        trainers = {}
        for mode in modes:
            cfg = from_dict({"model": model or {"preset": preset}, "data": {"seq_len": seq},
                             "train": {"steps": steps + warmup, "micro_batch": micro_batch,
                                       "grad_accum": grad_accum, "compile": mode == "compiled",
                                       "device": device},
                             "run": {"out_dir": f"{out}/{mode}", "progress": False, "save_every": 0,
                                     "eval_every": 0}})
            trainers[mode] = Trainer(cfg)
            trainers[mode].model.train()
        rows = {}
        for mode, trainer in trainers.items():
            warm = []
            for _ in range(max(warmup, 1)):
                t0 = time.perf_counter()
                trainer.train_step()
                warm.append(time.perf_counter() - t0)
            rows[mode] = {"first_step_s": warm[0], "times": []}
        for _ in range(steps):
            for mode, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step()
                rows[mode]["times"].append(time.perf_counter() - t0)
        trainer = trainers["eager"]
        config = trainer.model.config
        for row in rows.values():
            row.update(step_s=statistics.median(row["times"]), best_step_s=min(row["times"]))
        return {"preset": preset if model is None else "recipe", "seq": seq, "micro_batch": micro_batch,
                "grad_accum": grad_accum, "tokens_per_step": trainer.tokens_per_step,
                "flops_per_token": flops_per_token(config, seq, True)["fwd+bwd"],
                "params": config.param_counts(), "pattern": config.hybrid_override_pattern, "modes": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--recipe", help="take the model from this TOML recipe's [model] section instead "
                        "(e.g. configs/quickstart.toml; data stays synthetic)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time a trainer with train.compile")
    parser.add_argument("--device", default="cpu", help="train.device of the trainers: cpu (default), "
                        "cuda, cuda:N or auto; the matmul peak is measured there too")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from kinetic.device import resolve_device

    device = resolve_device(args.device, setting="--device")
    model = None
    if args.recipe:
        with open(args.recipe, "rb") as f:
            model = tomllib.load(f).get("model", {})
    size = 8192 if device.type == "cuda" else 2048  # a GPU needs a larger product to reach its peak
    peak_before = measure_peak(size, device=device)
    r = run(args.preset, args.seq, args.micro_batch, args.grad_accum, args.steps, args.warmup,
            compile=args.compile, model=model, device=str(device))
    peak = max(peak_before, measure_peak(size, device=device))
    for row in r["modes"].values():
        tps = r["tokens_per_step"] / row["step_s"]
        row.update(tokens_per_s=tps, mfu=tps * r["flops_per_token"] / (peak * 1e9))
    r.update(peak_gflops=peak, threads=torch.get_num_threads(), torch=torch.__version__, device=str(device))
    p = r["params"]
    what = args.recipe or f"preset {r['preset']}"
    print(f"\nkinetic training speed: {what} ({r['pattern']}, {p['total'] / 1e6:.2f}M params + "
          f"{p['mtp'] / 1e6:.2f}M MTP, {p['active'] / 1e6:.2f}M active), seq {r['seq']}, "
          f"{r['tokens_per_step']} tokens/step, fp32, on {device}" + (
              f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
              f", {r['threads']} threads"))
    print(f"peak fp32 matmul {peak:.1f} GFLOP/s; FLOPs/token (fwd+bwd, MTP included) "
          f"{r['flops_per_token'] / 1e6:.1f}M; median of {args.steps} steps after {max(args.warmup, 1)} "
          "warm-up\n")
    eager = r["modes"]["eager"]
    print(f"{'trainer':<9} {'first step s':>12} {'step ms':>9} {'best ms':>9} {'tokens/s':>10} "
          f"{'GFLOP/s':>9} {'MFU':>7} {'speed-up':>9}")
    for mode, row in r["modes"].items():
        print(f"{mode:<9} {row['first_step_s']:>12.1f} {row['step_s'] * 1e3:>9.1f} "
              f"{row['best_step_s'] * 1e3:>9.1f} {row['tokens_per_s']:>10.1f} "
              f"{row['tokens_per_s'] * r['flops_per_token'] / 1e9:>9.1f} {row['mfu'] * 100:>6.1f}% "
              f"{eager['step_s'] / row['step_s']:>8.2f}x")
    if "compiled" in r["modes"]:
        c = r["modes"]["compiled"]
        saved = eager["step_s"] - c["step_s"]
        extra = c["first_step_s"] - eager["first_step_s"]
        r["break_even_steps"] = extra / saved if saved > 0 else None
        print("\ncompiling pays for itself after " + (f"{r['break_even_steps']:,.0f} steps" if saved > 0
              else "no number of steps (the compiled step is not faster)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
