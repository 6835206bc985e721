"""RL with verifiable rewards on the one trainer (:class:`kinetic.train.trainer.Trainer`): a batch
source that samples rollouts with the current weights, and a loss function.

A step of the trainer, with ``grad_accum`` micro-batches:

1. :class:`RolloutSource` samples the step's rollouts at once: ``prompts_per_step`` prompts from
   ``problems(seed, index)`` (index = the step, so a resumed run samples the same prompts), G samples
   each from the batched decoder (:func:`kinetic.posttrain.rollout.rollouts`), with the model in eval
   mode and no gradient. ``reward(prompt, completion, metadata)`` scores each sample; overlong
   shaping (DAPO) is added; advantages are normalised within each group; with dynamic sampling, groups
   whose rewards are all equal are dropped and more prompts are drawn (up to ``max_refills`` times).
   The step's groups are split into the micro-batches, each carrying the step's completion-token
   count, so the loss does not depend on the split.
2. :func:`rl_loss` scores each micro-batch with the learner (``sequence_logprobs``, the function the
   sampler's log-probs agree with) and returns the clipped policy loss with the sampler/learner
   importance correction. It is normalised over the step (``per_step``), so the trainer does not
   divide it by ``grad_accum``.

:func:`freeze_routers` keeps the MoE routers' weights fixed during RL; the trainer's expert-bias
balancing still runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kinetic.infer.sampling import SamplingParams
from kinetic.infer.scoring import sequence_logprobs
from kinetic.model.moe import MoE
from kinetic.posttrain.grpo import (
    PolicyLossConfig,
    group_advantages,
    informative_groups,
    overlong_penalty,
    policy_loss,
)
from kinetic.posttrain.rollout import RolloutBatch, rollouts

Problems = Callable[[int, int], list[tuple[list[int], Any]]]  # (seed, n) -> [(prompt ids, metadata)]
Reward = Callable[[list[int], list[int], Any], float]  # (prompt ids, completion ids, metadata) -> reward


@dataclass(frozen=True)
class RLConfig:
    group_size: int = 8  # G: samples per prompt
    prompts_per_step: int = 4  # groups per optimizer step
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    scale_advantages: bool = False  # divide by the group's standard deviation too
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, draw more prompts
    max_refills: int = 3  # extra draws per step for dynamic sampling
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last tokens before the limit; 0 = off
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    seed: int = 0

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed)


@dataclass
class RLBatch:
    """One micro-batch of a step's rollouts, with what the loss needs."""

    input_ids: torch.Tensor  # (n, L)
    mask: torch.Tensor  # (n, L - 1) completion positions
    sampler_logp: torch.Tensor  # (n, L - 1)
    advantages: torch.Tensor  # (n,)
    total_tokens: int  # completion tokens of the whole step
    metrics: dict[str, float]  # the step's rollout statistics
    parts: int = 1  # micro-batches of the step

    def to(self, device, non_blocking: bool = False) -> RLBatch:
        move = dict(device=device, non_blocking=non_blocking)
        return replace(self, input_ids=self.input_ids.to(**move), mask=self.mask.to(**move),
                       sampler_logp=self.sampler_logp.to(**move), advantages=self.advantages.to(**move))


def environment_task(env, tokenizer, encode_prompt: Callable[[Any], list[int]] | None = None,
                     problem_seed: int = 0) -> tuple[Problems, Reward]:
    """The (problems, reward) pair :class:`RolloutSource` takes, for a text environment
    (:mod:`kinetic.posttrain.envs`): problem i of draw ``seed`` is the environment's problem
    (problem_seed, seed * n + i) -- so training draws never repeat and ``problem_seed`` keeps a held-out
    seed apart -- encoded by ``encode_prompt`` (default: the prompt text with ``tokenizer``; pass a
    chat template's encoder for a chat model); the reward decodes the completion (special tokens
    dropped) and returns ``env.verify(...).value``. A failure of the sandbox itself raises; it is
    never a reward of 0."""
    from kinetic.data.tokenizer import decode, encode

    def default(prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError("this environment's prompts are chat messages: pass encode_prompt, e.g. "
                             "a ChatTemplate's encode")
        return encode(tokenizer, prompt)

    encoder = encode_prompt or default

    def problems(seed: int, n: int):
        items = env.problems(problem_seed, n, start=seed * n)
        return [(encoder(p.prompt), (p.prompt, p.metadata)) for p in items]

    think, end = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")

    def text(prompt_ids: list[int], completion: list[int]) -> str:
        """The completion as the environment reads it: special tokens dropped, but the end of the
        reasoning kept as ``</think>`` on its own line (an unclosed one leaves ``<think>`` open)."""
        if end is not None and end in completion:
            cut = len(completion) - 1 - completion[::-1].index(end)
            return (decode(tokenizer, completion[:cut], skip_special_tokens=True) + "</think>\n"
                    + decode(tokenizer, completion[cut + 1:], skip_special_tokens=True))
        opened = think is not None and prompt_ids and prompt_ids[-1] == think
        return ("<think>" if opened else "") + decode(tokenizer, completion, skip_special_tokens=True)

    def reward(prompt_ids, completion, metadata) -> float:
        prompt, meta = metadata
        return float(env.verify(prompt, text(prompt_ids, completion), meta).value)

    return problems, reward


def mixture_task(tasks: dict[str, tuple[Problems, Reward]]) -> tuple[Problems, Reward]:
    """Several tasks as one: draw ``n`` problems round-robin over ``tasks`` (name -> (problems, reward)),
    each scored by its own reward; metadata is (name, the task's metadata)."""
    names = list(tasks)

    def problems(seed: int, n: int):
        counts = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
        out = []
        for name, count in zip(names, counts, strict=True):
            out += [(ids, (name, meta)) for ids, meta in tasks[name][0](seed, count)] if count else []
        return out

    def reward(prompt_ids, completion, metadata) -> float:
        name, meta = metadata
        return tasks[name][1](prompt_ids, completion, meta)

    return problems, reward


@torch.no_grad()
def accuracy(model: torch.nn.Module, tasks: dict[str, tuple[Problems, Reward]], n: int, seed: int,
             max_new_tokens: int, stop_ids: tuple[int, ...] | None = None) -> dict[str, float]:
    """Greedy accuracy (mean reward) of ``model`` on ``n`` problems of each task drawn with ``seed``."""
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    was = model.training
    model.eval()
    out = {}
    try:
        for name, (problems, reward) in tasks.items():
            items = problems(seed, n)
            batch = rollouts(model, [p for p, _ in items], 1, greedy, stop_ids=stop_ids)
            scores = [reward(p, c, m) for (p, m), c in zip(items, batch.completions, strict=True)]
            out[name] = sum(scores) / len(scores)
    finally:
        model.train(was)
    return out


def freeze_routers(model: torch.nn.Module) -> int:
    """Stop gradients to every MoE router's weights (the score-correction bias is a buffer the
    balancer updates); returns the number of routers frozen."""
    routers = [m.gate for m in model.modules() if isinstance(m, MoE)]
    for gate in routers:
        gate.weight.requires_grad_(False)
    return len(routers)


class RolloutSource:
    """The trainer's batch source for RL (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, problems: Problems, reward: Reward, config: RLConfig,
                 micro_batches: int = 1, stop_ids: tuple[int, ...] | None = None) -> None:
        if config.prompts_per_step % micro_batches:
            raise ValueError(f"prompts_per_step={config.prompts_per_step} must split into grad_accum="
                             f"{micro_batches} micro-batches of whole groups")
        self.model, self.problems, self.reward, self.config = model, problems, reward, config
        self.micro_batches = micro_batches
        self.stop_ids = stop_ids
        self.index = 0  # steps sampled
        self._queue: list[RLBatch] = []

    def next_batch(self) -> RLBatch:
        if not self._queue:
            self._queue = self._sample_step()
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index, self._queue = int(state["index"]), []

    # ------------------------------------------------------------------ one step's rollouts
    def _draw(self, attempt: int) -> tuple[RolloutBatch, torch.Tensor, list]:
        c = self.config
        seed = (c.seed * 1_000_003 + self.index) * 64 + attempt
        items = self.problems(seed, c.prompts_per_step)
        prompts = [p for p, _ in items]
        batch = rollouts(self.model, prompts, c.group_size, c.sampling(), stop_ids=self.stop_ids,
                         seed=seed * 4096)
        rewards = torch.tensor([self.reward(prompts[i // c.group_size], comp, items[i // c.group_size][1])
                                for i, comp in enumerate(batch.completions)], dtype=torch.float32)
        return batch, rewards, items

    @torch.no_grad()
    def _sample_step(self) -> list[RLBatch]:
        c, g = self.config, self.config.group_size
        was = self.model.training
        self.model.eval()  # sampling forwards must not touch training-only state
        kept: list[tuple[RolloutBatch, torch.Tensor, int]] = []  # (batch, rewards, group)
        raw_rewards, lengths, seconds, dropped = [], [], 0.0, 0
        try:
            for attempt in range(1 + (c.max_refills if c.dynamic_sampling else 0)):
                batch, rewards, _ = self._draw(attempt)
                seconds += batch.seconds
                raw_rewards.append(rewards)
                lengths += [len(x) for x in batch.completions]
                if c.overlong_buffer:
                    shaped = torch.tensor([len(x) for x in batch.completions])
                    rewards = rewards + overlong_penalty(shaped, c.max_new_tokens, c.overlong_buffer)
                useful = informative_groups(rewards, g) if c.dynamic_sampling else torch.ones(
                    len(rewards) // g, dtype=torch.bool)
                dropped += int((~useful).sum())
                kept += [(batch, rewards, i) for i in range(len(useful)) if useful[i]]
                if len(kept) >= c.prompts_per_step:
                    break
        finally:
            self.model.train(was)
        if not kept:  # every group uniform: nothing to learn this step (zero advantages)
            kept = [(batch, rewards, i) for i in range(c.prompts_per_step)]
        kept = kept[:c.prompts_per_step]
        self.index += 1
        all_rewards = torch.cat(raw_rewards)
        metrics = {"reward_mean": float(all_rewards.mean()), "reward_max": float(all_rewards.max()),
                   "completion_len_mean": sum(lengths) / len(lengths), "groups_dropped": float(dropped),
                   "sampling_s": seconds}
        return self._split(kept, metrics)

    def _split(self, kept: list, metrics: dict[str, float]) -> list[RLBatch]:
        c, g = self.config, self.config.group_size
        rows = [(b, slice(i * g, (i + 1) * g), r[i * g:(i + 1) * g]) for b, r, i in kept]
        width = max(int(b.input_ids.shape[1]) for b, _, _ in rows)

        def stack(name: str) -> torch.Tensor:  # right-pad every group's tensor to the widest
            return torch.cat([torch.nn.functional.pad(getattr(b, name)[s], (0, width - b.input_ids.shape[1]))
                              for b, s, _ in rows])

        ids, mask, sampler = stack("input_ids"), stack("mask"), stack("sampler_logp")
        adv = torch.cat([group_advantages(r, g, scale=c.scale_advantages) for _, _, r in rows])
        metrics = {**metrics, "advantage_abs_mean": float(adv.abs().mean())}
        total = max(int(mask.sum()), 1)
        per = len(rows) // self.micro_batches * g
        return [RLBatch(ids[i:i + per], mask[i:i + per], sampler[i:i + per], adv[i:i + per], total, metrics,
                        self.micro_batches) for i in range(0, len(rows) * g, per)]


def rl_loss(config: RLConfig):
    """The trainer's loss function for :class:`RLBatch` micro-batches (normalised per step)."""
    params = config.sampling()

    def loss_fn(model: torch.nn.Module, batch: RLBatch) -> tuple[torch.Tensor, dict[str, float]]:
        _, logp = sequence_logprobs(model, batch.input_ids, params)
        out = policy_loss(logp, logp.detach(), batch.advantages, batch.mask, batch.total_tokens, config.loss,
                          logp_sampler=batch.sampler_logp)
        # the trainer averages metrics over the micro-batches: each reports its share times their number
        return out.loss, {**batch.metrics, "policy_loss": float(out.loss.detach()) * batch.parts,
                          "clip_fraction": float(out.clip_fraction), "logprob_mismatch": float(out.mismatch)}

    loss_fn.per_step = True
    return loss_fn
