"""Where an RL step's time goes: sampling (the batched decoder, with log-probs), the learner's scoring
forward, and backward + optimizer, over a few GRPO steps on one machine; and the rollouts' sampled
tokens/s against the same decoder with no RL around it.

The model is ``--checkpoint`` (default: the quickstart run when it exists, else the tiny preset with
random weights); the reward is a stand-in any model can learn (the share of completion tokens below
a quarter of the vocabulary), since only the time is measured here.

    python benchmarks/rl_step.py
    python benchmarks/rl_step.py --steps 5 --group-size 16 --prompts 4 --json /tmp/rl_step.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import kinetic
from kinetic.infer.decoder import Decoder
from kinetic.posttrain.rl import RLConfig, RolloutSource, freeze_routers, rl_loss
from kinetic.train.config import from_dict
from kinetic.train.trainer import Trainer

QUICKSTART = Path("runs/quickstart/pretrain")


def load(checkpoint: str | None, tiny: bool = False):
    path = Path(checkpoint) if checkpoint else (QUICKSTART if (QUICKSTART / "checkpoints").exists() else None)
    path = None if tiny else path
    if path is not None:
        from kinetic.eval import resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        return kinetic.from_pretrained(ckpt), str(ckpt)
    torch.manual_seed(0)
    return kinetic.NemotronHForCausalLM(kinetic.preset("tiny")), "tiny preset, random weights"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny preset with random weights")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model, what = load(args.checkpoint, args.tiny)
    vocab = model.config.vocab_size

    def problems(seed: int, n: int):
        g = torch.Generator().manual_seed(seed)
        return [(torch.randint(10, vocab, (16,), generator=g).tolist(), None) for _ in range(n)]

    def reward(prompt, completion, metadata) -> float:
        return sum(t < vocab // 4 for t in completion) / max(len(completion), 1)

    config = RLConfig(group_size=args.group_size, prompts_per_step=args.prompts,
                      max_new_tokens=args.new_tokens, dynamic_sampling=False, seed=1)
    freeze_routers(model)
    timing = {"scoring_s": 0.0}
    inner = rl_loss(config)

    def timed_loss(net, batch):
        t = time.perf_counter()
        out = inner(net, batch)
        timing["scoring_s"] += time.perf_counter() - t
        return out

    timed_loss.per_step = True
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 32},
                         "train": {"steps": args.steps, "micro_batch": 1, "device": "cpu"},
                         "optim": {"lr": 1e-4}, "schedule": {"warmup_steps": 0},
                         "run": {"out_dir": out_dir, "eval_every": 0, "save_every": 0, "progress": False}})
        source = RolloutSource(model, problems, reward, config, stop_ids=())
        trainer = Trainer(cfg, model=model, train_source=source, loss_fn=timed_loss)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    sampling = sum(r["sampling_s"] for r in train)
    tokens = sum(r["completion_len_mean"] * args.group_size * args.prompts for r in train)
    # the same decoding with no RL around it: one decoder, the same group sizes, log-probs included
    model.eval()
    decoder = Decoder(model, max_batch=64)
    t = time.perf_counter()
    params = config.sampling()
    seqs = [s for p, _ in problems(5, args.prompts) for s in decoder.add(p, params, args.group_size)]
    decoder.run()  # each sequence ends at params.max_new_tokens = --new-tokens
    plain_tps = len(seqs) * args.new_tokens / (time.perf_counter() - t)
    out = {"model": what, "steps": args.steps, "group_size": args.group_size, "prompts": args.prompts,
           "new_tokens": args.new_tokens, "step_s": total / args.steps,
           "sampling_share": sampling / total, "scoring_share": timing["scoring_s"] / total,
           "update_share": 1 - (sampling + timing["scoring_s"]) / total,
           "rollout_tokens_per_s": tokens / sampling, "decoder_tokens_per_s": plain_tps}
    print(f"RL step, {what}: {args.steps} steps of {args.prompts} prompts x {args.group_size} samples x "
          f"{args.new_tokens} tokens; {torch.get_num_threads()} threads\n")
    print(f"  step                  {out['step_s']:.2f} s")
    print(f"  sampling              {out['sampling_share']:.0%}  ({out['rollout_tokens_per_s']:.0f} sampled "
          f"tok/s with log-probs; the decoder alone: {plain_tps:.0f} tok/s)")
    print(f"  learner scoring       {out['scoring_share']:.0%}  (forward + loss)")
    print(f"  backward + optimizer  {out['update_share']:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
