"""``kinetic pretrain``: train from a TOML recipe, data-parallel under ``torchrun``.

``kinetic pretrain --config configs/X.toml [--resume] [--set section.key=value ...]`` wires the
blended corpus loader (or synthetic tokens) into the shared :class:`~kinetic.train.Trainer`; under
``torchrun --nproc-per-node N`` every rank runs this command and rank 0 prints and writes the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kinetic.cli.model import human
from kinetic.errors import UserError


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
    from kinetic.train.checkpoint import CheckpointError

    try:
        train_src, val_src = make_sources(cfg, info)
    except ValueError as err:
        raise UserError(str(err)) from None
    tokenizer = Path(cfg.data.corpus) / "tokenizer.json" if cfg.data.corpus else None
    try:
        trainer = Trainer(cfg, train_source=train_src, val_source=val_src, dist_info=info,
                          tokenizer=tokenizer if tokenizer is not None and tokenizer.is_file() else None)
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
    try:
        summary = trainer.train(resume=args.resume)
    except CheckpointError as err:  # every checkpoint damaged, or written for another model
        raise UserError(f"--resume: {err}") from None
    if info.is_main:
        print_summary(summary, cfg)
    return 0


def print_summary(summary: dict, cfg) -> None:
    if summary.get("already_finished"):
        print(f"nothing to do: {cfg.run.out_dir} already finished at step {summary['steps']} "
              f"(train.steps={cfg.train.steps}); raise train.steps to train further")
    else:
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.1f} s "
              f"({summary['tokens_per_s']:,.0f} tokens/s), skipped {summary['skipped_steps']}")
    train, val = summary["final_train_lm_loss"], summary["final_val_loss"]
    if train is not None:
        print(f"final train LM loss {train:.4f}"
              + (f", validation loss {val:.4f}" if val is not None else ""))
    print(f"checkpoint {summary['checkpoint']}\nplot       {summary.get('plot')}\n"
          f"metrics    {Path(cfg.run.out_dir) / 'metrics.jsonl'}")


# ---------------------------------------------------------------------- registration
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` to the ``kinetic`` subparsers."""
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
