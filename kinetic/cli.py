"""The ``kinetic`` command: one subcommand per job.

* ``kinetic params CONFIG.json|CHECKPOINT_DIR|PRESET`` — parameter counts (total / active / MTP) and
  the layer mix of a config, computed arithmetically, so it works for 120B models on a laptop.
* ``kinetic demo --out DIR`` — build a random model from a preset, save it, reload it, check the
  reloaded logits are bit-identical, and generate a few tokens greedily.
* ``kinetic pretrain --config configs/X.toml [--resume] [--set section.key=value ...]`` — train;
  under ``torchrun --nproc-per-node N`` it runs data-parallel.
* ``kinetic data ...``, ``kinetic tokenizer train`` — corpora and tokenizer (kinetic.data.cli).
* ``kinetic eval``, ``kinetic generate``, ``kinetic chat``, ``kinetic serve`` — evaluation and
  inference (kinetic.eval, kinetic.infer).

Mistakes a user can make (a bad path, an unknown preset, an invalid config) print one line to stderr
and exit with code 2; a failed self-check exits with 1. ``demo`` also writes ``summary.json``
(versions, commit, tokens, timings) next to the checkpoint so a run can be reproduced from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import kinetic
from kinetic.config import PATTERN_TO_TYPE, PRESETS, ModelConfig, preset
from kinetic.hf import INDEX_NAME
from kinetic.model import NemotronHForCausalLM

LAYER_NAMES = {"M": "Mamba-2", "*": "attention", "-": "MLP", "E": "MoE"}
COUNT_LABELS = {"total": "total", "active": "active", "active_with_embeddings": "active + embeddings",
                "mtp": "mtp"}
DEMO_MAX_PARAMS = 2e9  # the demo builds the model in fp32 on the CPU; bigger presets do not fit


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------- formatting helpers
def human(n: float) -> str:
    """31577937344 -> '31.58B'; small numbers stay exact."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def layer_counts(pattern: str) -> dict[str, int]:
    return {c: pattern.count(c) for c in PATTERN_TO_TYPE}


def layer_summary(config: ModelConfig) -> str:
    counts = layer_counts(config.hybrid_override_pattern)
    mix = ", ".join(f"{counts[c]} {c} ({LAYER_NAMES[c]})" for c in PATTERN_TO_TYPE)
    return f"{config.num_hidden_layers} layers: {mix}"


def params_table(config: ModelConfig, source: str) -> str:
    counts = config.param_counts()
    exact = {k: f"{v:,}" for k, v in counts.items()}
    w_label = max(map(len, COUNT_LABELS.values()))
    w_exact = max(map(len, exact.values()))
    lines = [f"{'config':<{w_label}}  {source}", f"{'layers':<{w_label}}  {layer_summary(config)}",
             f"{'pattern':<{w_label}}  {config.hybrid_override_pattern}"]
    if config.num_nextn_predict_layers:
        lines.append(f"{'mtp layers':<{w_label}}  {config.num_nextn_predict_layers} x "
                     f"{config.mtp_hybrid_override_pattern}")
    lines.append("")
    for key, label in COUNT_LABELS.items():
        lines.append(f"{label:<{w_label}}  {exact[key]:>{w_exact}}  {human(counts[key]):>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- params
def load_config(arg: str) -> ModelConfig:
    """A preset name, a config.json file or a checkpoint directory."""
    if arg in PRESETS:
        return preset(arg)
    if Path(arg).exists():
        try:
            return ModelConfig.from_pretrained(arg)
        except (ValueError, TypeError, FileNotFoundError) as err:  # a bad config.json, not a bug here
            raise UserError(f"{arg}: {err}") from None
    raise UserError(f"{arg!r} is neither an existing config.json / checkpoint directory nor a preset; "
                    f"presets: {', '.join(PRESETS)}")


def cmd_params(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.json:
        out = dict(config.param_counts())
        out.update(source=args.config, num_hidden_layers=config.num_hidden_layers,
                   layers=layer_counts(config.hybrid_override_pattern),
                   pattern=config.hybrid_override_pattern,
                   num_nextn_predict_layers=config.num_nextn_predict_layers,
                   mtp_pattern=config.mtp_hybrid_override_pattern)
        print(json.dumps(out, indent=2))
    else:
        print(params_table(config, args.config))
    return 0


# ---------------------------------------------------------------------- demo
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _check_demo_args(args: argparse.Namespace, config: ModelConfig) -> None:
    if args.prompt_len < 1:
        raise UserError(f"--prompt-len={args.prompt_len} must be >= 1")
    if args.new_tokens < 1:
        raise UserError(f"--new-tokens={args.new_tokens} must be >= 1")
    counts = config.param_counts()
    total = counts["total"] + counts["mtp"]
    if total > DEMO_MAX_PARAMS:
        raise UserError(f"preset {args.preset!r} has {human(total)} parameters; the demo builds it in "
                        f"fp32 on the CPU, so use a preset under {human(DEMO_MAX_PARAMS)} "
                        "(e.g. tiny or small)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out={args.out} exists and is not a directory")


def _same_outputs(a, b) -> bool:
    if not a.logits.equal(b.logits):
        return False
    mtp_a, mtp_b = a.mtp_logits or [], b.mtp_logits or []
    return len(mtp_a) == len(mtp_b) and all(x.equal(y) for x, y in zip(mtp_a, mtp_b, strict=True))


def _timed_generate(model, prompt, new_tokens: int) -> tuple:
    """(ids, prefill seconds, decode seconds), all through ``model.generate`` (EOS ignored so exactly
    ``new_tokens`` come out). After a warm-up, a 1-token generate is the prefill; the rest of the
    full generate is the decode of new_tokens - 1 steps."""

    def timed(n: int):
        start = time.perf_counter()
        ids = model.generate(prompt, max_new_tokens=n, eos_token_id=None)
        return ids, time.perf_counter() - start

    timed(2)  # warm-up: first calls pay for allocator and kernel selection
    _, prefill_s = timed(1)
    ids, total_s = timed(new_tokens)
    return ids, prefill_s, max(total_s - prefill_s, 0.0)


def cmd_demo(args: argparse.Namespace) -> int:
    config = preset(args.preset)
    _check_demo_args(args, config)
    torch.manual_seed(args.seed)
    model = NemotronHForCausalLM(config).eval()
    out = Path(args.out)
    model.save_pretrained(out)
    reloaded = kinetic.from_pretrained(out)
    prompt = torch.randint(config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        if not _same_outputs(model(prompt), reloaded(prompt)):
            print(f"kinetic demo: error: logits of the model reloaded from {out} differ from the "
                  "original's; the checkpoint round trip is broken", file=sys.stderr)
            return 1
    ids, prefill_s, decode_s = _timed_generate(reloaded, prompt, args.new_tokens)
    new_ids = ids[0, args.prompt_len:].tolist()
    size = sum(f.stat().st_size for f in out.iterdir()
               if f.name in ("config.json", INDEX_NAME) or f.suffix == ".safetensors")

    print(params_table(config, f"preset {args.preset} (seed {args.seed})"))
    print(f"\ncheckpoint  {out}  ({human_bytes(size)}); reloaded logits match exactly")
    steps = max(len(new_ids) - 1, 0)
    print(f"timing      prefill {args.prompt_len} tok in {prefill_s * 1e3:.1f} ms "
          f"({args.prompt_len / max(prefill_s, 1e-9):,.0f} tok/s); decode {steps} tok in "
          f"{decode_s * 1e3:.1f} ms ({steps / max(decode_s, 1e-9):,.0f} tok/s)")
    print(f"prompt      {prompt[0].tolist()}")
    print(f"generated   {new_ids}")
    summary = {"command": "demo", "preset": args.preset, "seed": args.seed, "prompt": prompt[0].tolist(),
               "generated": new_ids, "prefill_s": prefill_s, "decode_s": decode_s,
               "checkpoint_bytes": size, "params": config.param_counts(),
               "versions": {"kinetic": kinetic.__version__, "torch": torch.__version__,
                            "python": platform.python_version()}, "git_commit": _git_commit()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------- pretrain
def make_sources(cfg, info):
    """(train, validation) batch sources for a training config: the blended corpus loader when
    ``data.corpus`` is set, else synthetic tokens (None lets the Trainer build those)."""
    if not cfg.data.corpus:
        return None, None
    from kinetic.data.loader import BlendedLoader

    corpus = Path(cfg.data.corpus)
    if not corpus.is_dir():
        raise UserError(f"data.corpus={cfg.data.corpus!r} is not a directory: build it with "
                        "`kinetic data build` first")
    common = dict(weights=cfg.data.weights or None, seq_len=cfg.data.seq_len,
                  batch_size=cfg.train.micro_batch, rank=info.rank, world_size=info.world_size)
    return (BlendedLoader(corpus, split="train", seed=cfg.train.seed, **common),
            BlendedLoader(corpus, split="val", seed=cfg.train.seed + 1, **common))


def cmd_pretrain(args: argparse.Namespace) -> int:
    from kinetic.train import load_config
    from kinetic.train.distributed import init_from_env, shutdown

    overrides = list(args.set)
    if args.precision:
        overrides.append(f"precision.recipe={args.precision}")
    if args.compile:
        overrides.append("train.compile=true")
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    try:
        info = init_from_env(cfg.train.device)
    except ValueError as err:  # train.device names a GPU this process cannot have
        raise UserError(str(err)) from None
    code = _pretrain(args, cfg, info)
    shutdown()  # only after success: a failing rank must exit so torchrun stops the others
    return code


def _pretrain(args: argparse.Namespace, cfg, info) -> int:
    from kinetic.train import Trainer

    try:
        train_src, val_src = make_sources(cfg, info)
    except ValueError as err:
        raise UserError(str(err)) from None
    try:
        trainer = Trainer(cfg, train_source=train_src, val_source=val_src, dist_info=info)
    except ValueError as err:  # e.g. an unknown precision recipe or recipe field
        raise UserError(str(err)) from None
    if trainer.precision is not None and info.is_main:
        print(trainer.precision.summary())
    if info.is_main:
        counts = trainer.model.config.param_counts()
        print(f"pretrain {args.config}: {trainer.model.config.hybrid_override_pattern} "
              f"({human(counts['total'])} params, {human(counts['active'])} active), "
              f"{cfg.train.steps} steps x {trainer.tokens_per_step:,} tokens, world size {info.world_size}, "
              f"on {trainer.device}")
    summary = trainer.train(resume=args.resume)
    if info.is_main:
        tokenizer = Path(cfg.data.corpus) / "tokenizer.json" if cfg.data.corpus else None
        if summary["checkpoint"] and tokenizer is not None and tokenizer.is_file():
            shutil.copy(tokenizer, Path(summary["checkpoint"]) / "tokenizer.json")
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.1f} s "
              f"({summary['tokens_per_s']:,.0f} tokens/s), skipped {summary['skipped_steps']}")
        val = summary["final_val_loss"]
        print(f"final train LM loss {summary['final_train_lm_loss']:.4f}, validation loss "
              f"{val:.4f}" if val is not None else "")
        print(f"checkpoint {summary['checkpoint']}\nplot       {summary.get('plot')}\n"
              f"metrics    {Path(cfg.run.out_dir) / 'metrics.jsonl'}")
    return 0


# ---------------------------------------------------------------------- eval / generate
def cmd_eval(args: argparse.Namespace) -> int:
    from kinetic.eval import evaluate_corpus, resolve_checkpoint
    from kinetic.infer.engine import device_options

    try:
        path = resolve_checkpoint(args.checkpoint)
        model = kinetic.from_pretrained(path, **device_options(args))
        res = evaluate_corpus(model, args.corpus, seq_len=args.seq_len, batch_size=args.batch_size,
                              max_tokens=args.max_tokens, progress=True)
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"checkpoint {path}\ncorpus     {args.corpus} (validation split, {args.seq_len}-token context)\n")
    print(f"{'domain':<14} {'tokens':>9} {'loss':>8} {'bits/byte':>10} {'unigram bpb':>12}")
    rows = [*res["domains"].items(), *([("overall", res["overall"])] if "overall" in res else [])]
    for name, r in rows:
        print(f"{name:<14} {r['tokens']:>9,} {r['loss']:>8.4f} {r['bpb']:>10.4f} {r['unigram_bpb']:>12.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kinetic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("params", help="parameter counts and layer mix of a config")
    p.add_argument("config", help=f"config.json, checkpoint directory, or preset ({', '.join(PRESETS)})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("demo", help="random model -> save -> reload -> check -> generate")
    p.add_argument("--out", required=True, help="directory for the checkpoint")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="train from a TOML config (data-parallel under torchrun)")
    p.add_argument("--config", required=True, help="TOML recipe, e.g. configs/quickstart.toml")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=20")
    p.add_argument("--precision", help="low-precision recipe: bf16, fp8, nvfp4 or another "
                   "kinetic.precision preset (emulated on CPU); default: fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile): the "
                   "first steps compile, minutes on a CPU; pays off on longer runs")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="validation loss and bits per byte per domain vs a unigram baseline")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or a pretrain run dir")
    p.add_argument("--corpus", required=True, help="corpus built by `kinetic data build`")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="cap on scored tokens per domain")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="also write the results as JSON here")
    from kinetic.infer.engine import add_chat_args, add_device_args, add_generate_args, cmd_chat, cmd_generate

    add_device_args(p)
    p.set_defaults(func=cmd_eval)

    from kinetic.infer.server import add_serve_args, cmd_serve

    p = sub.add_parser("generate", help="continue prompts from a checkpoint (streamed)")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive terminal chat with a checkpoint")
    add_chat_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, chat page at /")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    from kinetic.data.cli import register as register_data_commands

    register_data_commands(sub)  # data sources / data build / tokenizer train
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns 0 on success, raises SystemExit(code) on failure."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (UserError, OSError) as err:  # OSError: unwritable --out, full disk, ...
        print(f"kinetic {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    # ``python -m kinetic.cli`` (as torchrun runs it): call main of the imported module kinetic.cli,
    # since the subcommands raise its UserError, which this file's own copy (__main__) would not catch
    from kinetic.cli import main as cli_main

    sys.exit(cli_main())
