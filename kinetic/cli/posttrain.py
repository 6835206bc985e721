"""``kinetic sft``: supervised fine-tuning of a checkpoint on chats (OpenAI ``messages`` JSONL), on
the shared trainer (:mod:`kinetic.posttrain.sft`); ``kinetic rl``: RL with verifiable rewards from a
checkpoint on built-in environments (:mod:`kinetic.posttrain.rl`), with held-out greedy accuracy
before and after.

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
    register_rl(sub)


def cmd_rl(args: argparse.Namespace) -> int:
    import json

    import kinetic
    from kinetic.data.tokenizer import TOKENIZER_FILE, load_tokenizer
    from kinetic.eval import resolve_checkpoint
    from kinetic.infer.chat_template import ChatTemplate
    from kinetic.posttrain.envs import make
    from kinetic.posttrain.grpo import PolicyLossConfig
    from kinetic.posttrain.rl import (
        RLConfig,
        RolloutSource,
        accuracy,
        environment_task,
        freeze_routers,
        mixture_task,
        rl_loss,
    )
    from kinetic.train import Trainer
    from kinetic.train.config import from_dict

    for name in ("steps", "group_size", "prompts", "max_new_tokens", "eval_problems"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    try:
        ckpt = resolve_checkpoint(args.init_from)
        model = kinetic.from_pretrained(ckpt)
        tok = load_tokenizer(ckpt / TOKENIZER_FILE)
        template = ChatTemplate.from_pretrained(ckpt)
        envs = {name: make(name, **({"path": args.gsm8k} if name == "gsm8k" else {})) for name in args.env}
        loss = PolicyLossConfig(eps_low=args.eps_low, eps_high=args.eps_high, kl_coef=0.0)
        config = RLConfig(group_size=args.group_size, prompts_per_step=args.prompts,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          dynamic_sampling=not args.no_dynamic_sampling, overlong_buffer=args.overlong_buffer,
                          loss=loss, seed=args.seed)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None

    def encode_prompt(prompt) -> list[int]:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return template.encode(tok, messages, enable_thinking=not args.no_thinking)

    train = {name: environment_task(env, tok, encode_prompt, problem_seed=0) for name, env in envs.items()}
    held_out = {name: environment_task(env, tok, encode_prompt, problem_seed=1) for name, env in envs.items()}
    stop = tuple(template.stop_token_ids(tok))
    problems, reward = mixture_task(train)
    out = Path(args.out)
    before = accuracy(model, held_out, args.eval_problems, 0, args.max_new_tokens, stop)
    freeze_routers(model)
    cfg = from_dict({
        "model": {"preset": "tiny"},  # unused: the model comes from --init-from
        "data": {"seq_len": args.max_new_tokens},
        "train": {"steps": args.steps, "micro_batch": 1, "seed": args.seed, "device": "cpu"},
        "optim": {"lr": args.lr, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 0},
        "loss": {"balance_loss": 0.0},
        "run": {"out_dir": str(out), "eval_every": 0, "save_every": args.save_every, "log_every": 1,
                "progress": True}})
    source = RolloutSource(model, problems, reward, config, stop_ids=stop)
    trainer = Trainer(cfg, model=model, train_source=source, loss_fn=rl_loss(config), tokenizer=ckpt)
    summary = trainer.train(resume=args.resume)
    after = accuracy(model, held_out, args.eval_problems, 0, args.max_new_tokens, stop)
    report = {"environments": list(envs), "held_out_problems": args.eval_problems,
              "accuracy_before": before, "accuracy_after": after, "steps": summary["steps"]}
    (out / "rl_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'environment':<16} {'before':>8} {'after':>8}   "
          f"(greedy, {args.eval_problems} held-out problems each)")
    for name in envs:
        print(f"{name:<16} {before[name]:>8.1%} {after[name]:>8.1%}")
    return 0


def register_rl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="RL with verifiable rewards (GRPO family) from a checkpoint")
    p.add_argument("--init-from", required=True, help="checkpoint (or run directory) to start from")
    p.add_argument("--env", action="append", required=True,
                   help="environment (repeatable): arithmetic, word_problems, strings, instructions, "
                   "python, gsm8k (with --gsm8k)")
    p.add_argument("--gsm8k", default=None, help="path to GSM8K's data (for --env gsm8k)")
    p.add_argument("--out", required=True, help="run directory (metrics, plots, checkpoints, rl_eval.json)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eps-low", type=float, default=0.2)
    p.add_argument("--eps-high", type=float, default=0.28)
    p.add_argument("--overlong-buffer", type=int, default=0, help="DAPO overlong shaping; 0 = off")
    p.add_argument("--no-dynamic-sampling", action="store_true", help="keep groups whose rewards are equal")
    p.add_argument("--no-thinking", action="store_true", help="prompts with a pre-closed think block")
    p.add_argument("--eval-problems", type=int, default=50, help="held-out problems per environment")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_rl)
