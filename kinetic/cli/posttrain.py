"""``kinetic sft``: supervised fine-tuning of a checkpoint on chats (OpenAI ``messages`` JSONL), on
the shared trainer (:mod:`kinetic.posttrain.sft`).

``kinetic sft --init-from CK --data chats.jsonl --out DIR [--steps N] [--resume]`` gives the
checkpoint the chat tokens (``<think>``, ``</think>``, ``<|tool|>``) if it lacks them, renders every
chat in the reasoning chat format (:mod:`kinetic.data.chat`) with the reasoning-control
augmentation, packs them, and trains; every checkpoint it writes carries the tokenizer with the chat
tokens and that format as its chat template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kinetic.errors import UserError


def cmd_sft(args: argparse.Namespace) -> int:
    import kinetic
    from kinetic.data.chat import REASONING_TEMPLATE
    from kinetic.data.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer
    from kinetic.eval import resolve_checkpoint
    from kinetic.posttrain.sft import SFTSource, chat_examples, read_chats, sft_loss, with_chat_tokens
    from kinetic.train import Trainer
    from kinetic.train.config import from_dict

    for name in ("steps", "seq_len", "micro_batch", "grad_accum"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("strip_reasoning", "cut_reasoning"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} must be in [0, 1]")
    try:
        ckpt = resolve_checkpoint(args.init_from)
        model = kinetic.from_pretrained(ckpt)
        tok = load_tokenizer(ckpt / TOKENIZER_FILE)
        chats = read_chats(args.data)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"{err}") from None
    with_chat_tokens(model, tok)
    out = Path(args.out)
    tokenizer_dir = out / "tokenizer"
    save_tokenizer(tok, tokenizer_dir, model.config.max_position_embeddings, REASONING_TEMPLATE)
    try:
        examples = chat_examples(tok, chats, strip_reasoning=args.strip_reasoning,
                                 cut_reasoning=args.cut_reasoning, seed=args.seed)
        source = SFTSource(examples, args.seq_len, args.micro_batch, seed=args.seed,
                           pad_id=model.config.pad_token_id or 0)
    except ValueError as err:
        raise UserError(f"--data {args.data}: {err}") from None
    cfg = from_dict({
        "model": {"preset": "tiny"},  # unused: the model comes from --init-from
        "data": {"seq_len": args.seq_len},
        "train": {"steps": args.steps, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
                  "seed": args.seed, "device": "cpu"},
        "optim": {"lr": args.lr},
        "schedule": {"warmup_steps": min(args.steps // 10, 100)},
        "loss": {"mtp_scale": 0.0},
        "run": {"out_dir": str(out), "eval_every": 0, "save_every": args.save_every,
                "log_every": max(1, args.steps // 50), "progress": True}})
    print(f"sft: {ckpt} on {len(chats):,} chats -> {len(examples):,} examples "
          f"({sum(sum(e.mask) for e in examples):,} counted tokens), {args.steps} steps -> {out}")
    trainer = Trainer(cfg, model=model, train_source=source, loss_fn=sft_loss(args.per_conversation),
                      tokenizer=tokenizer_dir)
    summary = trainer.train(resume=args.resume)
    if summary.get("already_finished"):
        print(f"sft: {out} already finished at step {summary['steps']}; nothing to do")
    else:
        print(f"sft: done; checkpoint {summary['checkpoint']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sft`` to the ``kinetic`` subparsers."""
    p = sub.add_parser("sft", help="fine-tune a checkpoint on chats (JSONL of OpenAI messages)")
    p.add_argument("--init-from", required=True, help="checkpoint (or run directory) to start from")
    p.add_argument("--data", required=True, help="JSONL, one {\"messages\": [...]} per line")
    p.add_argument("--out", required=True, help="run directory (metrics, plots, checkpoints)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=512, help="packed row length; longer chats are an error")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--strip-reasoning", type=float, default=0.1,
                   help="share of examples trained with their reasoning removed (an empty think block)")
    p.add_argument("--cut-reasoning", type=float, default=0.03,
                   help="share cut at a random reasoning budget with a forced </think>")
    p.add_argument("--per-conversation", action="store_true",
                   help="average the loss per conversation instead of per token")
    p.add_argument("--save-every", type=int, default=0, help="0 = only the final checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(func=cmd_sft)
