"""``kinetic eval``: validation loss and bits per byte of a checkpoint, per domain of a corpus.

Scores the validation split of a corpus built by ``kinetic data build`` against a unigram baseline
(:func:`kinetic.eval.evaluate_corpus`) and prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kinetic
from kinetic.cli.infer import add_device_args, device_options
from kinetic.errors import UserError


def cmd_eval(args: argparse.Namespace) -> int:
    from kinetic.eval import evaluate_corpus, resolve_checkpoint

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


# ---------------------------------------------------------------------- registration
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the ``kinetic`` subparsers."""
    p = sub.add_parser("eval", help="validation loss and bits per byte per domain vs a unigram baseline")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or a pretrain run dir")
    p.add_argument("--corpus", required=True, help="corpus built by `kinetic data build`")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="cap on scored tokens per domain")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="also write the results as JSON here")
    add_device_args(p)
    p.set_defaults(func=cmd_eval)
