"""RL on the one trainer: a reward the model can learn (use the first quarter of the vocabulary) rises
within 20 steps of a tiny model, the run is the same for the same seed, micro-batching does not change
a step's gradient, routers stay frozen while the expert biases still move, and the run writes its
metrics and plot."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make_cfg

from kinetic.posttrain.grpo import PolicyLossConfig
from kinetic.posttrain.rl import RLConfig, RolloutSource, freeze_routers, rl_loss
from kinetic.train.trainer import Trainer, build_model

ALLOWED = 128  # the reward: the share of completion tokens below this id (a quarter of the vocabulary)


def problems(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(10, 200, (4,), generator=g).tolist(), None) for _ in range(n)]


def reward(prompt, completion, metadata) -> float:
    return sum(t < ALLOWED for t in completion) / max(len(completion), 1)


def _run(tmp_path, steps: int, accum: int = 1, name: str = "run", save_every: int = 0, resume: bool = False,
         **rl):
    cfg = make_cfg(tmp_path / name, train={"steps": steps, "grad_accum": accum, "micro_batch": 1},
                   optim={"lr": 1e-2, "weight_decay": 0.0}, schedule={"warmup_steps": 0},
                   loss={"balance_loss": 0.0},
                   run={"eval_every": 0, "save_every": save_every, "log_every": 1})
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    pattern = model.config.hybrid_override_pattern + model.config.mtp_hybrid_override_pattern
    assert freeze_routers(model) == pattern.count("E")  # the MTP layer's router too
    config = RLConfig(**{"group_size": 8, "prompts_per_step": 4, "max_new_tokens": 8, "temperature": 1.0,
                         "seed": 1, **rl})
    source = RolloutSource(model, problems, reward, config, micro_batches=accum, stop_ids=())
    trainer = Trainer(cfg, model=model, train_source=source, loss_fn=rl_loss(config))
    summary = trainer.train(resume=resume)
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, summary, [r for r in records if r.get("type") == "train"]


def test_rl_raises_a_learnable_reward_and_is_reproducible(tmp_path):
    trainer, summary, train = _run(tmp_path, 20)
    rewards = [r["reward_mean"] for r in train]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, rewards  # measured: 0.24 -> 0.75
    for key in ("clip_fraction", "logprob_mismatch", "advantage_abs_mean", "completion_len_mean",
                "policy_loss", "sampling_s"):
        assert key in train[-1], key
    assert train[-1]["logprob_mismatch"] < 1e-3
    assert (tmp_path / "run" / "loss.png").is_file() and summary["steps"] == 20
    # the routers did not move; the expert biases did
    fresh = build_model(trainer.cfg)
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), fresh.named_parameters(), strict=True):
        if name.endswith("gate.weight"):
            assert torch.equal(p, q), name
    biases = [b for n, b in trainer.model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert any(float(b.abs().sum()) > 0 for b in biases)
    _, _, again = _run(tmp_path, 3, name="again")
    assert [r["reward_mean"] for r in again] == rewards[:3]  # same seed, same curve


def test_micro_batches_do_not_change_a_step(tmp_path):
    """One step as 1 or 4 micro-batches of whole groups: the same rollouts and the same gradient (the
    loss is normalised by the step's token count, and the trainer does not divide it again)."""
    one, _, a = _run(tmp_path, 1, accum=1, name="one", dynamic_sampling=False)
    four, _, b = _run(tmp_path, 1, accum=4, name="four", dynamic_sampling=False)
    assert a[0]["reward_mean"] == b[0]["reward_mean"]
    assert abs(a[0]["grad_norm"] - b[0]["grad_norm"]) <= 1e-5 * a[0]["grad_norm"]
    assert abs(a[0]["policy_loss"] - b[0]["policy_loss"]) <= 1e-6


def test_an_interrupted_rl_run_resumes_exactly(tmp_path):
    """4 steps in one go, or 2 steps, a new process (fresh model and source) and --resume to 4: the
    same weights (the step index seeds the prompts and the samples)."""
    whole, _, _ = _run(tmp_path, 4, name="whole")
    _run(tmp_path, 2, name="split", save_every=2)
    resumed, _, _ = _run(tmp_path, 4, name="split", save_every=2, resume=True)
    pairs = zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        assert torch.equal(p, q), name


def test_environment_task_scores_reference_answers():
    """The adapter from a text environment: prompts encoded, completions decoded and verified; a
    reference answer scores 1, a wrong one 0, and draws of different seeds do not repeat problems."""
    from kinetic.data.tokenizer import encode, train_tokenizer
    from kinetic.posttrain.envs import make
    from kinetic.posttrain.rl import environment_task

    tok = train_tokenizer(["What is 12 + 30? Answer: 42\n" * 50], vocab_size=300)
    env = make("arithmetic")
    problems, reward = environment_task(env, tok)
    first, second = problems(0, 3), problems(1, 3)
    assert {tuple(p) for p, _ in first}.isdisjoint({tuple(p) for p, _ in second})
    for prompt_ids, meta in first:
        reference = meta[1]["reference"]
        assert reward(prompt_ids, encode(tok, reference), meta) == 1.0
        assert reward(prompt_ids, encode(tok, "Answer: 0.5"), meta) == 0.0


def test_environment_task_reads_the_end_of_reasoning():
    """A completion in the reasoning format (``... </think>Answer: 11``, the special token between):
    the answer counts after ``</think>``; reasoning left open after a prompt that opened it counts for
    nothing."""
    from kinetic.data.chat import add_chat_tokens, encode_chat
    from kinetic.data.tokenizer import encode, train_tokenizer
    from kinetic.posttrain.envs import make
    from kinetic.posttrain.rl import environment_task

    tok = train_tokenizer(["What is 7 + 4? 7 + 4 = 11\nAnswer: 11\n" * 50], vocab_size=300)
    add_chat_tokens(tok)
    env = make("arithmetic", max_digits=1, ops="+")

    def prompt(text: str) -> list[int]:
        return encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]

    problems, reward = environment_task(env, tok, prompt)
    prompt_ids, meta = problems(0, 1)[0]
    answer = meta[1]["answer"]
    end = tok.token_to_id("</think>")
    good = encode(tok, "adding") + [end] + encode(tok, f"Answer: {answer}") + [2]
    assert reward(prompt_ids, good, meta) == 1.0
    assert reward(prompt_ids, encode(tok, f"Answer: {answer}"), meta) == 0.0  # still reasoning


def test_rollout_source_checks_the_split():
    with pytest.raises(ValueError, match="prompts_per_step=3"):
        RolloutSource(None, problems, reward, RLConfig(prompts_per_step=3), micro_batches=2)
    with pytest.raises(ValueError, match="eps_low"):
        PolicyLossConfig(eps_low=1.5)
