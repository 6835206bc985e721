"""Rollouts from the batched decoder laid out for the policy loss: ids, masks and the sampler's
log-probs aligned with the learner's (sequence_logprobs), stop tokens, seeds, and one policy-loss
step through them."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, randomize

from kinetic import NemotronHForCausalLM
from kinetic.infer.sampling import SamplingParams
from kinetic.infer.scoring import sequence_logprobs
from kinetic.posttrain.grpo import group_advantages, policy_loss
from kinetic.posttrain.rollout import rollouts

PARAMS = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=9, seed=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(NemotronHForCausalLM(make_config("latent-grouped-mtp")), seed=2, dt_bias=0.5).eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 8, 3)]


def test_layout_and_sampler_logprobs_match_the_learner(model):
    prompts = _prompts()
    batch = rollouts(model, prompts, 4, PARAMS, stop_ids=())
    assert batch.input_ids.shape[0] == 12 and batch.group_size == 4
    assert batch.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i, completion in enumerate(batch.completions):
        prompt = prompts[i // 4]
        assert len(completion) == 9 and not batch.stopped[i]
        ids = batch.input_ids[i]
        assert ids[:len(prompt)].tolist() == prompt
        where = batch.mask[i].nonzero().flatten()
        assert where.tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + 9))
        assert ids[where + 1].tolist() == completion  # position p predicts token p + 1
    with torch.no_grad():
        _, learner = sequence_logprobs(model, batch.input_ids, PARAMS)
    diff = torch.where(batch.mask.bool(), learner - batch.sampler_logp, 0.0).abs().max()
    assert float(diff) < 1e-4
    assert float((batch.sampler_logp * (1 - batch.mask)).abs().max()) == 0
    assert batch.completion_tokens == 108 and batch.seconds > 0


def test_stop_tokens_seeds_and_prefix_sharing(model):
    prompts = _prompts()
    a = rollouts(model, prompts, 3, PARAMS, stop_ids=())
    b = rollouts(model, prompts, 3, PARAMS, stop_ids=())
    assert a.completions == b.completions  # the seed fixes the samples
    c = rollouts(model, prompts, 3, PARAMS, stop_ids=(), seed=99)
    assert c.completions != a.completions
    assert len({tuple(x) for x in a.completions[:3]}) > 1  # the samples of one prompt differ
    stop = a.completions[0][2]  # a token the first sample draws third
    d = rollouts(model, prompts, 3, PARAMS, stop_ids=(stop,))
    assert d.completions[0] == a.completions[0][:a.completions[0].index(stop) + 1] and d.stopped[0]
    for done, completion in zip(d.stopped, d.completions, strict=True):
        assert (completion[-1] == stop) == done and len(completion) <= 9 and completion.count(stop) <= 1
    with pytest.raises(ValueError, match="group_size"):
        rollouts(model, prompts, 0, PARAMS)


def test_a_policy_loss_step_through_a_rollout_batch(model):
    """On-policy (logp_old = the learner's, detached): the loss is -sum(A mask) / tokens and its
    gradient reaches the weights."""
    batch = rollouts(model, _prompts(), 4, PARAMS, stop_ids=())
    rewards = torch.tensor([float(len(c) % 2) for c in batch.completions]) + torch.arange(12) % 4 * 0.25
    adv = group_advantages(rewards, 4)
    model.zero_grad()
    _, learner = sequence_logprobs(model, batch.input_ids, PARAMS)
    count = int(batch.mask.sum())
    out = policy_loss(learner, learner.detach(), adv, batch.mask, count, logp_sampler=batch.sampler_logp)
    want = -(adv[:, None] * batch.mask).sum() / count
    assert abs(float(out.loss.detach()) - float(want)) < 1e-3  # importance weights are 1 up to rounding
    assert float(out.mismatch) < 1e-4
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and float(model.lm_head.weight.grad.abs().sum()) > 0
