"""Low-precision pretraining study: the same model on the same data for the same tokens in fp32, bf16,
fp8, NVIDIA's NVFP4 recipe and its ablations (no random Hadamard transform, no stochastic rounding,
1-D weight scaling, no high-precision layers), plus NVFP4 switched to BF16 for the final part.

Every run is a kinetic.train.Trainer run from the same seed (same init, same batches); the recipe is
applied to ``trainer.model`` right after the Trainer is built (the optimizer already holds the same
Parameter objects, so swapping modules is safe). GEMMs are *emulated* (kinetic.precision.linear):
bit-exact operand quantization, fp32 products, so the numbers measure quantization error, not speed.
Validation runs through the same quantized forward the model trains with; ``val (hp fwd)`` evaluates
the final weights again with every GEMM in high precision.

Writes ``results.json``, ``loss_curves.png`` and one run directory per recipe to ``--out``, and prints
the table. The default model is the ``tiny`` preset without latent MoE/MTP and with 8 blocks, so
NVIDIA's default selection keeps ~15% of the linear layers in high precision (for a latent-MoE model
it also keeps latent projections, attention and MTP, which is most of tiny's GEMMs).

    python benchmarks/precision_study.py                      # every recipe, 300 steps each
    python benchmarks/precision_study.py --seeds 0,1,2        # seed-to-seed spread of every gap
    python benchmarks/precision_study.py --steps 60 --recipes bf16,nvfp4
    python benchmarks/precision_study.py --corpus runs/quickstart/corpus --model tiny
    python benchmarks/precision_study.py --replot --out runs/precision_study
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kinetic.precision import apply_recipe, get_recipe, restore_high_precision
from kinetic.train import Trainer
from kinetic.train.config import from_dict

RECIPES = ("fp32", "bf16", "fp8", "nvfp4", "nvfp4-no-rht", "nvfp4-no-sr", "nvfp4-1d-weights",
           "nvfp4-all-quantized", "nvfp4-switch")
SWITCH_AT = 0.8  # "nvfp4-switch": NVFP4, then BF16 GEMMs for the last 20% of steps
# tiny without latent MoE and MTP, 8 blocks: NVIDIA's default keeps the last block (1 of 8)
STUDY_MODEL = dict(hybrid_override_pattern="M*EM-EME", moe_latent_size=None, num_nextn_predict_layers=0)


def train_config(args: argparse.Namespace, seed: int, out_dir: Path, vocab: int | None) -> dict:
    overrides = dict(STUDY_MODEL) if args.model == "study" else {}
    if vocab is not None:
        overrides["vocab_size"] = vocab
    return {"model": {"preset": "tiny", "overrides": overrides},
            "data": {"seq_len": args.seq, "corpus": args.corpus or ""},
            "train": {"steps": args.steps, "micro_batch": args.micro_batch, "seed": seed,
                      "threads": args.threads},
            "optim": {"lr": args.lr},
            "schedule": {"warmup_steps": max(args.steps // 20, 1), "decay_fraction": 0.2},
            "run": {"out_dir": str(out_dir), "log_every": 5, "eval_every": args.eval_every,
                    "eval_batches": args.eval_batches, "save_every": 0, "keep_checkpoints": 1,
                    "progress": False}}


def sources(cfg, corpus: str | None):
    if not corpus:
        return None, None  # the Trainer's SyntheticSource: a fixed random Markov chain
    from kinetic.data.loader import BlendedLoader

    common = dict(seq_len=cfg.data.seq_len, batch_size=cfg.train.micro_batch)
    return (BlendedLoader(corpus, split="train", seed=cfg.train.seed, **common),
            BlendedLoader(corpus, split="val", seed=cfg.train.seed + 1, **common))


def switch_when_due(trainer: Trainer, step: int) -> None:
    """Wrap the loss so that, from optimizer step ``step`` on, the quantized GEMMs run in BF16 (the
    trainer hook ``switch_to_bf16_at`` asks for, done from outside here)."""
    inner = trainer.loss_fn

    def loss_fn(model, batch):
        if trainer.step >= step:
            restore_high_precision(trainer.model, to="bf16")
        return inner(model, batch)

    trainer.loss_fn = loss_fn


def run_one(name: str, seed: int, args: argparse.Namespace, out: Path, vocab: int | None) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    cfg = from_dict(train_config(args, seed, run_dir, vocab))
    train_src, val_src = sources(cfg, args.corpus)
    trainer = Trainer(cfg, train_source=train_src, val_source=val_src)
    report = None
    if name != "fp32":
        recipe = get_recipe("nvfp4" if name == "nvfp4-switch" else name, seed=seed)
        if name == "nvfp4-switch":
            recipe = recipe.replace(switch_to_bf16_at=SWITCH_AT)
            switch_when_due(trainer, recipe.switch_step(args.steps))
        report = apply_recipe(trainer.model, recipe)
    start = time.perf_counter()
    summary = trainer.train()
    wall = time.perf_counter() - start
    restore_high_precision(trainer.model)
    hp_val = trainer.evaluate()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"recipe": name, "seed": seed, "final_val_loss": summary["final_val_loss"],
            "val_hp_forward": hp_val, "final_train_lm_loss": summary["final_train_lm_loss"], "wall_s": wall,
            "kept_fraction": report.kept_fraction if report else 1.0,
            "gemms": report.summary() if report else "fp32 (no recipe)",
            "val_curve": [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"],
            "train_curve": [(r["step"], r["lm_loss"]) for r in records if r.get("type") == "train"]}


def aggregate(results: list[dict]) -> list[dict]:
    """One row per recipe: means over seeds, and the gap to bf16 of the same seed (same init and data)."""
    base = {r["seed"]: r["final_val_loss"] for r in results if r["recipe"] == "bf16"}
    rows = []
    for name in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == name]
        gaps = [100 * (r["final_val_loss"] / base[r["seed"]] - 1) for r in runs if r["seed"] in base]
        keys = ("final_val_loss", "val_hp_forward", "wall_s")
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
        rows.append({"recipe": name, "seeds": len(runs), "kept_fraction": runs[0]["kept_fraction"], **mean,
                     "gap_pct": sum(gaps) / len(gaps) if gaps else None,
                     "gap_pct_range": (min(gaps), max(gaps)) if gaps else None})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'recipe':<22}{'kept hp':>8}{'val loss':>10}{'vs bf16':>9}{'(min..max over seeds)':>23}"
             f"{'val (hp fwd)':>14}{'wall s':>8}", "-" * 94]
    for r in rows:
        gap = f"{r['gap_pct']:+.2f}%" if r["gap_pct"] is not None else "n/a"
        spread = ""
        if r["seeds"] > 1 and r["gap_pct_range"]:
            spread = "{:+.2f}..{:+.2f}%".format(*r["gap_pct_range"])
        lines.append(f"{r['recipe']:<22}{100 * r['kept_fraction']:>7.0f}%{r['final_val_loss']:>10.4f}"
                     f"{gap:>9}{spread:>23}{r['val_hp_forward']:>14.4f}{r['wall_s']:>8.1f}")
    return "\n".join(lines)


def gap_curves(results: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per recipe: validation-loss gap to bf16 (%) at each eval step, averaged over seeds."""
    base = {(r["seed"], step): loss
            for r in results if r["recipe"] == "bf16" for step, loss in r["val_curve"]}
    curves: dict[str, dict[int, list[float]]] = {}
    for r in results:
        for step, loss in r["val_curve"]:
            if (r["seed"], step) in base:
                gap = 100 * (loss / base[r["seed"], step] - 1)
                curves.setdefault(r["recipe"], {}).setdefault(step, []).append(gap)
    return {name: (sorted(c), [sum(c[s]) / len(c[s]) for s in sorted(c)]) for name, c in curves.items()}


def plot(results: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    seeds = sorted({r["seed"] for r in results})
    fig, (ax_val, ax_gap) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in (r for r in results if r["seed"] == seeds[0]):
        style = "--" if r["recipe"] in ("fp32", "bf16") else "-"
        steps, losses = zip(*r["val_curve"], strict=True)
        ax_val.plot(steps, losses, style + "o", label=r["recipe"], markersize=3, linewidth=1.2)
    for name, (steps, gaps) in gap_curves(results).items():
        style = "--" if name in ("fp32", "bf16") else "-"
        ax_gap.plot(steps, gaps, style + "o", label=name, markersize=3, linewidth=1.2)
    ax_val.set(title=f"validation loss, seed {seeds[0]} (quantized forward)", xlabel="step", ylabel="loss",
               yscale="log")
    ax_gap.set(title=f"validation loss vs bf16, mean over seeds {seeds}", xlabel="step",
               ylabel="relative gap (%)")
    ax_gap.axhline(1.5, color="gray", linestyle=":", linewidth=1)
    for ax in (ax_val, ax_gap):
        ax.grid(alpha=0.3)
    ax_gap.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("kinetic precision study (CPU emulation of the quantized GEMMs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="comma-separated, from: " + ", ".join(RECIPES))
    parser.add_argument("--model", choices=("study", "tiny"), default="study",
                        help="'study': tiny without latent MoE/MTP, 8 blocks; 'tiny': the preset as is")
    parser.add_argument("--corpus", help="packed corpus dir (kinetic data build); default synthetic tokens")
    # 300 steps (8 x 64 x 300 = 154k tokens, the same for every recipe): at fewer steps the recipes are
    # still far from converged and overstate the NVFP4 gap to bf16 (this benchmark at --steps 150 shows it)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (init, data, RHT, SR)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the GEMMs are tiny, and 1 avoids OpenMP spin on a busy machine")
    parser.add_argument("--out", default="runs/precision_study")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the table and plot from --out/results.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        results = json.loads((out / "results.json").read_text())["runs"]
        print(table(aggregate(results)) + f"\nplot {plot(results, out / 'loss_curves.png')}")
        return aggregate(results)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    vocab = None
    if args.corpus:
        from kinetic.data.loader import read_index

        vocab = read_index(args.corpus)["vocab_size"]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            results.append(run_one(name, seed, args, out, vocab))
            r = results[-1]
            print(f"{name:<22} seed {seed}  val {r['final_val_loss']:.4f}  hp-fwd {r['val_hp_forward']:.4f}  "
                  f"{r['wall_s']:.0f} s  [{r['gemms']}]", flush=True)
    rows = aggregate(results)
    print("\n" + table(rows))
    (out / "results.json").write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                                                  "table": rows, "runs": results}, indent=2))
    png = plot(results, out / "loss_curves.png")
    print(f"\nresults {out / 'results.json'}" + (f"\nplot    {png}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
