"""Reasoning control at inference, for a checkpoint with the reasoning chat format: reasoning and
answer kept apart (``reasoning`` / ``reasoning_content``), ``enable_thinking=False``, and a reasoning
budget that forces ``</think>`` at a line end past the budget or at budget + slack, after which the
answer follows; through the engine and the server (``chat_template_kwargs``, as vLLM takes them)."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import live_server

from kinetic import NemotronHForCausalLM, preset
from kinetic.data.chat import REASONING_TEMPLATE, add_chat_tokens
from kinetic.data.tokenizer import encode, train_tokenizer
from kinetic.infer import ChatTemplate, Engine, SamplingParams, create_app
from kinetic.infer.engine import GenerationSequence

USER = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def engine():
    tok = train_tokenizer(["What is 2 + 3? 2 plus 3 is 5.\nAnswer: 5\n" * 40], vocab_size=300)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny").replace(vocab_size=300))
    return Engine(model, tok, chat_template=ChatTemplate(REASONING_TEMPLATE, eos_token="<eos>"))


def test_reasoning_and_answer_are_kept_apart(engine):
    tok = engine.tokenizer
    think, end = engine.think_ids
    prompt = engine.encode_chat(USER)
    assert prompt[-1] == think
    seq = GenerationSequence(prompt, SamplingParams(max_new_tokens=50, stop_strings=("plus",)),
                             engine.eos_token_ids, engine.max_context, tok, think=engine.think_ids)
    reasoning, answer = encode(tok, "2 plus 3 is 5."), encode(tok, "Answer: 5")
    for t in [*reasoning, end, *answer]:
        seq.advance(t)
    seq.advance(engine.eos_token_ids[0])
    result = seq.result()
    assert result.reasoning == "2 plus 3 is 5." and result.text == "Answer: 5"  # "plus" stops answers only
    closed = engine.encode_chat(USER, enable_thinking=False)
    assert closed[-2:] == [think, end]
    off = GenerationSequence(closed, SamplingParams(), (), 100, tok, think=engine.think_ids)
    assert off.reasoning is None


@pytest.mark.parametrize("speculative", [False, True])
def test_a_reasoning_budget_forces_the_end_of_reasoning(engine, speculative):
    eng = Engine(engine.model, engine.tokenizer, chat_template=engine.chat_template, speculative=speculative)
    budget, slack = 6, 4
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, ignore_eos=True,
                            reasoning_budget=budget, reasoning_slack=slack)
    ats = []
    for result in eng.generate([eng.encode_chat(USER)], params, n=4):
        end = eng.think_ids[1]
        assert end in result.token_ids, result.token_ids
        at = result.token_ids.index(end)
        assert at <= budget + slack  # reasoning tokens before </think>
        assert len(result.token_ids) > at + 1  # an answer follows
        assert result.reasoning is not None
        ats.append(at)
    assert max(ats) >= budget  # the random model did not close its reasoning itself: it was forced


def test_the_server_returns_reasoning_content(engine):
    app = create_app(engine, "m")
    with live_server(app) as url:
        body = {"messages": USER, "max_tokens": 30, "temperature": 1.0, "seed": 1, "ignore_eos": True,
                "chat_template_kwargs": {"reasoning_budget": 4}}
        out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        message = out["choices"][0]["message"]
        assert isinstance(message["reasoning_content"], str) and isinstance(message["content"], str)
        off = httpx.post(f"{url}/v1/chat/completions", json={
            **body, "chat_template_kwargs": {"enable_thinking": False}}, timeout=60).json()
        assert "reasoning_content" not in off["choices"][0]["message"]
        bad = httpx.post(f"{url}/v1/chat/completions", json={
            **body, "chat_template_kwargs": {"thinking_budget": 4}}, timeout=60)
        assert bad.status_code == 400 and "thinking_budget" in bad.text
        stream = {**body, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=stream, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert any('"reasoning_content"' in line for line in lines)
