"""Batched decoding against one sequence at a time, in one run on one machine:

1. G samples of one prompt (what RL rollouts need): the decoder with ``n=G`` (the prompt prefilled
   once, the samples decoded in one forward per step) against G runs one after another with the same
   seeds; tokens/s and the ratio, and whether the samples are identical (they should be, up to a
   near-tie flipped by the rounding of a different batch size);
2. B different prompts, greedy: decoded together against one at a time, with the same check.

The model is ``--checkpoint`` (default: the quickstart run when it exists), else the tiny preset with
random weights. Plain decoding by default; ``--speculative`` drafts with MTP, ``--compile`` runs the
compiled decode step.

    python benchmarks/batch_decode.py
    python benchmarks/batch_decode.py --samples 16 --new-tokens 64 --json /tmp/batch.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import kinetic
from kinetic.infer.decoder import Decoder
from kinetic.infer.execution import Compiled
from kinetic.infer.sampling import SamplingParams

QUICKSTART = Path("runs/quickstart/pretrain")


def load(checkpoint: str | None):
    """(model, prompt ids, description)."""
    path = Path(checkpoint) if checkpoint else (QUICKSTART if (QUICKSTART / "checkpoints").exists() else None)
    if path is not None:
        from kinetic.data.tokenizer import TOKENIZER_FILE, encode, load_tokenizer
        from kinetic.eval import resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        tok = load_tokenizer(ckpt / TOKENIZER_FILE)
        prompts = ["The Congress shall", "def parse_args(", "The state of the Union is",
                   "class Parser:\n    def __init__(self", "We the People of the United States"]
        return kinetic.from_pretrained(ckpt).eval(), [encode(tok, p) for p in prompts], str(ckpt)
    torch.manual_seed(0)
    model = kinetic.NemotronHForCausalLM(kinetic.preset("tiny")).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
               for n in (12, 30, 7, 21, 16)]
    return model, prompts, "tiny preset, random weights"


def run(decoder: Decoder, groups: list[tuple[list[int], SamplingParams, int]], tokens: int
        ) -> list[list[int]]:
    """Add every (prompt, params, n) group with ``tokens`` new tokens each and run the decoder."""
    seqs = [s for prompt, params, n in groups
            for s in decoder.add(prompt, replace(params, max_new_tokens=tokens), n)]
    decoder.run()
    return [[t.id for t in s.tokens] for s in seqs]


def best(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def compare(model, together: list, alone: list, tokens: int, repeats: int, options: dict) -> dict:
    """Seconds for ``together`` (one decoder) and for each group of ``alone`` on its own decoder."""
    def batched():
        return run(Decoder(model, max_batch=16, **options()), together, tokens)

    def sequential():
        return [ids for group in alone
                for ids in run(Decoder(model, max_batch=16, **options()), [group], tokens)]

    batched()  # warm-up (compiles, with --compile)
    t_batch, out_batch = best(batched, repeats)
    t_seq, out_seq = best(sequential, repeats)
    total = sum(len(x) for x in out_batch)
    return {"sequences": len(out_batch), "tokens": total, "batched_tokens_per_s": total / t_batch,
            "one_at_a_time_tokens_per_s": total / t_seq, "speedup": t_seq / t_batch,
            "identical_tokens": out_batch == out_seq}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--samples", type=int, default=16, help="G: samples of one prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speculative", action="store_true", help="draft with the MTP layers")
    parser.add_argument("--compile", action="store_true", help="the compiled decode step")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model, prompts, what = load(args.checkpoint)

    def options():
        return dict(speculative=args.speculative, execution=Compiled() if args.compile else None)

    sampled = SamplingParams(temperature=0.8, top_k=40, seed=0)
    out = {"model": what, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
           "speculative": args.speculative, "compile": args.compile}
    g = args.samples
    alone = [(prompts[0], SamplingParams(temperature=0.8, top_k=40, seed=j), 1) for j in range(g)]
    out["samples"] = compare(model, [(prompts[0], sampled, g)], alone, args.new_tokens, args.repeats, options)
    greedy = SamplingParams(temperature=0)
    many = [prompts[i % len(prompts)] for i in range(g)]
    out["prompts"] = compare(model, [(p, greedy, 1) for p in many], [(p, greedy, 1) for p in many],
                             args.new_tokens, args.repeats, options)
    print(f"batched decoding, {what}; {out['threads']} threads, {args.new_tokens} new tokens each, "
          f"{'speculative' if args.speculative else 'plain'}{', compiled' if args.compile else ''}\n")
    print(f"{'case':<28} {'batched tok/s':>14} {'one at a time':>14} {'speed-up':>9} {'identical':>10}")
    for key, label in (("samples", f"{g} samples of one prompt"), ("prompts", f"{g} prompts, greedy")):
        r = out[key]
        print(f"{label:<28} {r['batched_tokens_per_s']:>14.1f} {r['one_at_a_time_tokens_per_s']:>14.1f} "
              f"{r['speedup']:>8.2f}x {str(r['identical_tokens']):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
