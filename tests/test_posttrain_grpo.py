"""The GRPO-family loss pieces against hand-computed numbers: group advantages, dynamic sampling,
overlong shaping, the clipped loss (REINFORCE gradient at ratio 1, exact zeros outside the clip range
on the advantage's side), micro-batching with the step's token count, the importance correction
(a no-op where sampler and learner agree), the KL term, and the sampler/learner log-prob ratio on
the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config, randomize

from kinetic import NemotronHForCausalLM
from kinetic.infer.decoder import Decoder
from kinetic.infer.sampling import SamplingParams
from kinetic.infer.scoring import sequence_logprobs
from kinetic.posttrain.grpo import (
    PolicyLossConfig,
    group_advantages,
    importance_weights,
    informative_groups,
    overlong_penalty,
    policy_loss,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    torch.testing.assert_close(group_advantages(rewards, 4),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    # scaled: the first group's population std is 0.5
    torch.testing.assert_close(group_advantages(rewards, 4, scale=True),
                               torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert informative_groups(rewards, 4).tolist() == [True, False]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 60, 70, 80, 100, 120])
    # max 100, buffer 40: free up to 60, then -1/40 per token, -1 from 100 on
    torch.testing.assert_close(overlong_penalty(lengths, 100, 40),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 100, 0)


def _leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_at_ratio_one_the_loss_has_the_reinforce_gradient():
    """logp_old = logp: d loss / d logp_t = -A_t * mask_t / total_tokens, REINFORCE's gradient."""
    logp = _leaf([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    out = policy_loss(logp, logp.detach(), adv, mask, total_tokens=5)
    out.loss.backward()
    want = -(adv[:, None] * mask) / 5
    torch.testing.assert_close(logp.grad, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.loss, -(adv[:, None] * mask).sum() / 5)  # ratio 1: -sum(A)/count
    assert float(out.clip_fraction) == 0.0


def test_clipping_zeroes_gradients_outside_the_range_on_the_advantages_side():
    """eps 0.2 / 0.28: ratios e^x for x in log([0.7, 0.9, 1.1, 1.4]); a positive advantage loses
    the gradient above 1.28 only, a negative one below 0.8 only; elsewhere it is -A r / count."""
    ratios = torch.tensor([0.7, 0.9, 1.1, 1.4], dtype=torch.float64)
    old = torch.zeros(2, 4, dtype=torch.float64)
    logp = _leaf(torch.log(ratios).repeat(2, 1).tolist())
    adv = torch.tensor([2.0, -3.0], dtype=torch.float64)
    out = policy_loss(logp, old, adv, torch.ones(2, 4, dtype=torch.float64), total_tokens=8,
                      config=PolicyLossConfig(eps_low=0.2, eps_high=0.28))
    out.loss.backward()
    want = torch.tensor([[-2 * 0.7, -2 * 0.9, -2 * 1.1, 0.0],   # A > 0: clipped (no grad) above 1.28
                         [0.0, 3 * 0.9, 3 * 1.1, 3 * 1.4]],      # A < 0: clipped below 0.8
                        dtype=torch.float64) / 8
    torch.testing.assert_close(logp.grad, want, atol=1e-12, rtol=0)
    assert logp.grad[0, 3] == 0 and logp.grad[1, 0] == 0  # exactly zero
    assert float(out.clip_fraction) == pytest.approx(2 / 8)
    # the loss value: -min(rA, clip(r)A) per token
    clip = ratios.clamp(0.8, 1.28)
    value = -(torch.minimum(ratios * 2, clip * 2).sum() + torch.minimum(ratios * -3, clip * -3).sum()) / 8
    torch.testing.assert_close(out.loss, value)


def test_micro_batches_with_the_steps_token_count_equal_the_full_batch():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(8, 12, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(8, 12, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 13, (8,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).double()
    total = int(mask.sum())
    full = policy_loss(logp, old, adv, mask, total).loss
    parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], total).loss
                for i in range(0, 8, 2))
    assert abs(float(full - parts)) <= 1e-6
    # a per-micro-batch mean (the mistake the global count avoids) differs
    means = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                            int(mask[i:i + 2].sum())).loss for i in range(0, 8, 2)) / 4
    assert abs(float(full - means)) > 1e-3


def test_importance_correction_is_a_no_op_when_sampler_and_learner_agree():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.05
    adv, mask = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)
    plain = policy_loss(logp, old, adv, mask, 15)
    same = policy_loss(logp, old, adv, mask, 15, logp_sampler=old.clone())
    assert float(plain.loss.detach()) == float(same.loss.detach()) and float(same.mismatch) == 0
    # a sampler that gave a token less probability weighs it up, truncated at the cap
    sampler = old.clone()
    sampler[0, 0] -= 0.1
    sampler[1, 1] -= 5.0
    w = importance_weights(old, sampler, cap=2.0)
    assert w[0, 0] == pytest.approx(math.exp(0.1)) and w[1, 1] == 2.0 and w[2, 2] == 1.0
    assert not w.requires_grad


def test_padding_with_infinite_log_probs_stays_out():
    """Padding positions may score -inf (outside a top-p set): loss and gradient stay finite."""
    logp = _leaf([[-1.0, -math.inf]])
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = policy_loss(logp, logp.detach(), torch.tensor([1.0], dtype=torch.float64), mask, 1,
                      logp_sampler=torch.tensor([[-1.0, -math.inf]], dtype=torch.float64))
    out.loss.backward()
    assert float(out.loss.detach()) == -1.0 and torch.isfinite(logp.grad).all()


def test_kl_term_by_hand():
    logp = _leaf([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]], dtype=torch.float64)
    config = PolicyLossConfig(kl_coef=0.1)
    out = policy_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64), torch.ones(1, 2), 2,
                      config, logp_ref=ref)
    k3 = math.exp(-0.5) + 0.5 - 1  # exp(ref - logp) - (ref - logp) - 1 at the first token; 0 at the second
    assert float(out.kl) == pytest.approx(k3 / 2)
    assert float(out.loss.detach()) == pytest.approx(0.1 * k3 / 2)
    with pytest.raises(ValueError, match="logp_ref"):
        policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), 2, config)


def test_sampler_and_learner_log_probs_on_the_same_weights():
    """Rollouts of the batched decoder scored by the learner's function: the ratio
    exp(learner - sampler) is 1 to float32 rounding, with temperature and top-p (measured
    differences: docs/performance.md, "Log-probs: sampler against scorer")."""
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(make_config("latent-grouped-mtp")), seed=3, dt_bias=0.5).eval()
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=4)
    decoder = Decoder(model, max_batch=4)
    prompt = torch.randint(3, 96, (7,), generator=torch.Generator().manual_seed(5)).tolist()
    seqs = decoder.add(prompt, params, n=4)
    while decoder.busy:
        for s, _ in decoder.step():
            if len(s.tokens) >= 10:
                decoder.cancel(s)
    ids = torch.tensor([prompt + [t.id for t in s.tokens[:10]] for s in seqs])
    with torch.no_grad():
        _, learner = sequence_logprobs(model, ids, params)
    sampler = torch.tensor([[t.processed_logprob for t in s.tokens[:10]] for s in seqs])
    ratio = torch.exp(learner[:, len(prompt) - 1:] - sampler)
    assert float((ratio - 1).abs().max()) < 1e-4
