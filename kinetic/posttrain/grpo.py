"""The policy-gradient pieces of RL with verifiable rewards, GRPO family (as in NVIDIA's NeMo-RL, TRL
and DAPO), as plain functions of tensors so that each can be checked against hand-computed numbers.

Shapes legend: g groups (prompts), G samples per group, n = g * G sequences, t completion tokens
(right-padded; ``mask`` marks real ones).

* **Advantages** (:func:`group_advantages`): a sample's reward minus the mean reward of its group,
  optionally divided by the group's standard deviation; every token of the sample shares it.
* **Dynamic sampling** (:func:`informative_groups`): a group whose rewards are all equal has zero
  advantages and teaches nothing; it is dropped and the batch refilled.
* **Overlong shaping** (:func:`overlong_penalty`, DAPO's soft punishment): 0 up to
  ``max_tokens - buffer`` tokens, then falling linearly to -1 at ``max_tokens``.
* **Clipped policy loss** (:func:`policy_loss`): per token, with r = exp(logp - logp_old),
  ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` (asymmetric clipping: a higher ceiling lets
  unlikely tokens with a positive advantage grow), times a truncated importance weight between the
  sampler and the learner, plus ``kl_coef`` times the k3 estimate of KL(policy || reference). The sum
  over the real tokens of a micro-batch is divided by the token count of the whole step
  (``total_tokens``), so that splitting the step into micro-batches does not change the loss.
* **Importance correction** (:func:`importance_weights`): the sampler's log-probs differ from the
  learner's (another numerical path, or weights a step behind); a token's weight is
  ``min(exp(logp_old - logp_sampler), cap)``, without gradient; 1 where they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards (n,), consecutive runs of ``group_size`` samples per prompt -> advantages (n,): reward
    minus its group's mean, divided by the group's standard deviation (+ eps) when ``scale``."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (groups.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(g,) boolean: the groups whose rewards are not all equal (dynamic sampling keeps these)."""
    groups = rewards.view(-1, group_size)
    return (groups != groups[:, :1]).any(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment of completions of ``lengths`` tokens: 0 up to
    ``max_tokens - buffer``, then linear down to -1 at ``max_tokens`` (and -1 past it)."""
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"buffer={buffer} must be in (0, max_tokens={max_tokens}]")
    over = (lengths.float() - (max_tokens - buffer)) / buffer
    return -over.clamp(min=0.0, max=1.0)


def importance_weights(logp_old: torch.Tensor, logp_sampler: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights min(exp(logp_old - logp_sampler), cap), without gradient."""
    return torch.exp(logp_old.detach() - logp_sampler.detach()).clamp(max=cap)


@dataclass(frozen=True)
class PolicyLossConfig:
    eps_low: float = 0.2  # lower clip: ratio >= 1 - eps_low
    eps_high: float = 0.28  # upper clip: ratio <= 1 + eps_high (DAPO's "clip higher")
    kl_coef: float = 0.0  # weight of KL(policy || reference); 0 = no reference model
    importance_cap: float = 2.0  # truncation of the sampler/learner importance weight

    def __post_init__(self) -> None:
        for name in ("eps_low", "eps_high", "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.eps_low >= 1:
            raise ValueError(f"eps_low={self.eps_low} must be < 1 (the ratio's floor is 1 - eps_low)")
        if self.importance_cap < 1:
            raise ValueError(f"importance_cap={self.importance_cap} must be >= 1")


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar: this micro-batch's share of the step's loss
    clip_fraction: torch.Tensor  # share of this micro-batch's tokens whose ratio was clipped
    kl: torch.Tensor  # mean k3 KL estimate over the micro-batch's tokens (0 without a reference)
    mismatch: torch.Tensor  # mean |logp_old - logp_sampler| over the tokens


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                total_tokens: int, config: PolicyLossConfig = PolicyLossConfig(),
                logp_sampler: torch.Tensor | None = None,
                logp_ref: torch.Tensor | None = None) -> PolicyLoss:
    """The clipped policy-gradient loss of one micro-batch (see the module docstring).

    logp (n, t): the learner's log-probs of the sampled tokens, with gradient; logp_old (n, t): the
    same before this step's updates (detached; equal to ``logp`` on the first, on-policy update);
    advantages (n,) or (n, t); mask (n, t): 1 on completion tokens; ``total_tokens``: the real tokens
    of the whole step, over every micro-batch; logp_sampler (n, t): what the sampler reported (None:
    no correction); logp_ref (n, t): a reference model's (needed when ``config.kl_coef`` > 0)."""
    if total_tokens <= 0:
        raise ValueError(f"total_tokens={total_tokens} must be > 0 (the step's completion tokens)")
    if config.kl_coef > 0 and logp_ref is None:
        raise ValueError("config.kl_coef > 0 needs logp_ref, the reference model's log-probs")
    keep = mask.bool()  # padding may hold -inf log-probs (outside a top-p set): never let them in
    logp, logp_old = torch.where(keep, logp, 0.0), torch.where(keep, logp_old, 0.0)
    logp_sampler = None if logp_sampler is None else torch.where(keep, logp_sampler, 0.0)
    logp_ref = None if logp_ref is None else torch.where(keep, logp_ref, 0.0)
    mask = mask.to(logp.dtype)
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - logp_old.detach())
    clipped = ratio.clamp(1 - config.eps_low, 1 + config.eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    weights = None
    if logp_sampler is not None:
        weights = importance_weights(logp_old, logp_sampler, config.importance_cap)
        per_token = per_token * weights
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if logp_ref is not None:
        log_ratio = logp_ref.detach() - logp
        k3 = torch.exp(log_ratio) - log_ratio - 1  # >= 0, unbiased for KL(policy || reference)
        per_token = per_token + config.kl_coef * k3
        kl = (k3 * mask).sum() / mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / total_tokens
    count = mask.sum().clamp(min=1)
    was_clipped = ((ratio < 1 - config.eps_low) & (adv < 0)) | ((ratio > 1 + config.eps_high) & (adv > 0))
    mismatch = (torch.zeros((), device=logp.device) if logp_sampler is None
                else ((logp_old - logp_sampler).abs().detach() * mask).sum() / count)
    return PolicyLoss(loss, (was_clipped.to(mask.dtype) * mask).sum().detach() / count, kl.detach(), mismatch)
