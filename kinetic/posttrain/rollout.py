"""Rollouts for RL: G samples of each prompt from the batched decoder, laid out for the policy loss.

:func:`rollouts` adds every prompt to one :class:`~kinetic.infer.decoder.Decoder` with ``n=G`` (its
prompt prefilled once, its samples decoded in the running batch with everything else) and stops a
sample at a stop token or at ``max_new_tokens``. The result, :class:`RolloutBatch`, holds the
prompt + completion ids right-padded into one tensor, aligned with what
:func:`kinetic.infer.scoring.sequence_logprobs` returns (position p scores token p + 1):

    input_ids      (n, L)      prompt, completion, padding
    mask           (n, L - 1)  1 where position p predicts a completion token
    sampler_logp   (n, L - 1)  the sampler's log-prob of that token (processed distribution), else 0

so that ``sequence_logprobs(model, batch.input_ids, params)[1]`` gives the learner's log-probs at the
same places, and :func:`kinetic.posttrain.grpo.policy_loss` takes both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kinetic.infer.decoder import Decoder
from kinetic.infer.sampling import SamplingParams


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (n, L) prompt + completion, right-padded with pad_id
    mask: torch.Tensor  # (n, L - 1) float: position p predicts a completion token
    sampler_logp: torch.Tensor  # (n, L - 1) the sampler's processed log-probs there, 0 elsewhere
    prompt_index: torch.Tensor  # (n,) the prompt each sample belongs to (samples of a prompt adjacent)
    completions: list[list[int]]  # each sample's completion ids (the stop token included)
    stopped: list[bool]  # ended by a stop token (False: by the length limit)
    seconds: float = 0.0  # wall-clock time the sampling took
    stats: dict = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return int((self.prompt_index == self.prompt_index[0]).sum())

    @property
    def completion_tokens(self) -> int:
        return sum(map(len, self.completions))


def rollouts(model: torch.nn.Module, prompts: list[list[int]], group_size: int, params: SamplingParams,
             stop_ids: tuple[int, ...] | None = None, max_batch: int = 64, pad_id: int = 0,
             seed: int | None = None, speculative: bool = False) -> RolloutBatch:
    """``group_size`` samples of every prompt (token ids), each up to ``params.max_new_tokens``
    tokens or a stop token (default: the model's EOS ids); sample j of prompt i is seeded with
    ``seed + i * group_size + j`` (``seed`` defaults to ``params.seed``; None = fresh randomness)."""
    if group_size < 1 or group_size > max_batch:
        raise ValueError(f"group_size={group_size} must be in [1, max_batch={max_batch}]")
    if not prompts or any(not p for p in prompts):
        raise ValueError("rollouts need at least one prompt, and no empty prompt")
    stop = set(model.config.eos_token_ids if stop_ids is None else stop_ids)
    base = params.seed if seed is None else seed
    decoder = Decoder(model, max_batch=max_batch, speculative=speculative)
    t0 = time.perf_counter()
    seqs = []
    for i, prompt in enumerate(prompts):
        seeds = None if base is None else [base + i * group_size + j for j in range(group_size)]
        seqs += decoder.add(prompt, params, group_size, seeds=seeds)
    done: dict[int, bool] = {}
    while decoder.busy:  # the decoder ends a sample at max_new_tokens; a stop token ends it here
        for s, _ in decoder.step():
            ended = next((k for k, t in enumerate(s.tokens) if t.id in stop), None)
            if ended is not None:
                del s.tokens[ended + 1:]
                decoder.cancel(s)
            if s.done:
                done[id(s)] = ended is not None
    seconds = time.perf_counter() - t0
    return _layout(seqs, [done[id(s)] for s in seqs], group_size, pad_id, seconds, decoder)


def _layout(seqs, stopped: list[bool], group_size: int, pad_id: int, seconds: float,
            decoder: Decoder) -> RolloutBatch:
    width = max(len(s.prompt) + len(s.tokens) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width - 1)
    sampler = torch.zeros(n, width - 1)
    for i, s in enumerate(seqs):
        ids = s.prompt + [t.id for t in s.tokens]
        input_ids[i, :len(ids)] = torch.tensor(ids)
        start = len(s.prompt) - 1  # position start predicts the first completion token
        span = slice(start, start + len(s.tokens))
        mask[i, span] = 1.0
        sampler[i, span] = torch.tensor([t.processed_logprob for t in s.tokens])
    index = torch.arange(n) // group_size
    return RolloutBatch(input_ids, mask, sampler, index, [[t.id for t in s.tokens] for s in seqs], stopped,
                        seconds, decoder.stats.as_dict() if decoder.speculative else {})
