"""SFT: a checkpoint gains the chat tokens without changing its old logits; examples with only
assistant output counted and the reasoning-control augmentation; packing of whole examples with an
exact resume; the per-token and per-conversation losses against hand computation; and a short SFT
run on the one trainer that learns."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make_cfg

from kinetic import NemotronHForCausalLM, preset
from kinetic.data.tokenizer import decode, train_tokenizer
from kinetic.ops.loss import IGNORE_INDEX
from kinetic.posttrain.sft import (
    SFTSource,
    chat_examples,
    grow_vocabulary,
    read_chats,
    sft_loss,
    with_chat_tokens,
)
from kinetic.train.trainer import Trainer

TEXT = "What is 12 + 30? Let me add: 12 plus 30 is 42. Answer: 42\n"


def _chat(i: int, reasoning: bool = True) -> list[dict]:
    a, b = 10 + i % 7, 20 + i % 5
    return [{"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"Answer: {a + b}",
             "reasoning_content": f"{a} plus {b} is {a + b}." if reasoning else None}]


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([TEXT * 40], vocab_size=300)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny").replace(vocab_size=tok.get_vocab_size()))
    with_chat_tokens(model, tok)
    return tok, model


def test_a_checkpoint_gains_the_chat_tokens_without_changing_old_logits(tmp_path):
    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny").replace(vocab_size=300)).eval()
    ids = torch.randint(0, 300, (1, 12))
    before = model(ids).logits
    assert grow_vocabulary(model, 303) == 3 and model.config.vocab_size == 303
    after = model(ids).logits
    torch.testing.assert_close(after[..., :300], before)
    rows = model.backbone.embeddings.weight
    torch.testing.assert_close(rows[300], rows[:300].mean(0))
    model.save_pretrained(tmp_path)
    assert NemotronHForCausalLM.from_pretrained(tmp_path).config.vocab_size == 303
    assert grow_vocabulary(model, 200) == 0


def test_examples_count_only_assistant_output_and_augment(setup):
    tok, _ = setup
    (plain,) = chat_examples(tok, [_chat(0)])
    counted = decode(tok, [t for t, m in zip(plain.ids, plain.mask, strict=True) if m])
    assert counted == "<think>10 plus 20 is 30.</think>Answer: 30<eos>"
    chats = [_chat(i) for i in range(400)]
    examples = chat_examples(tok, chats, strip_reasoning=0.2, cut_reasoning=0.1, seed=1)
    end = tok.token_to_id("</think>")
    stripped = cut = 0
    for e in examples:
        close = e.ids.index(end)
        if e.ids[close - 1] == tok.token_to_id("<think>"):
            stripped += 1
        elif e.mask[close] == 0:  # a forced </think> does not count
            cut += 1
            assert len(e.ids) < len(chat_examples(tok, [chats[e.conversation]])[0].ids)
    assert 0.14 < stripped / 400 < 0.26 and 0.06 < cut / 400 < 0.15, (stripped, cut)
    assert chat_examples(tok, chats, strip_reasoning=0.2, cut_reasoning=0.1, seed=1) == examples


def test_read_chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": _chat(1)}) + "\n\n" + json.dumps({"messages": _chat(2)}) + "\n")
    assert read_chats(path) == [_chat(1), _chat(2)]
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"chats.jsonl:1 must be an object with a 'messages' list"):
        read_chats(path)


def test_packing_keeps_examples_whole_and_resumes_exactly(setup):
    tok, _ = setup
    examples = chat_examples(tok, [_chat(i, reasoning=i % 2 == 0) for i in range(30)])
    source = SFTSource(examples, seq_len=63, micro_batch=2, seed=4)
    seen = []
    while source.epoch == 0:
        batch = source.next_batch()
        for r in range(batch.tokens.shape[0]):
            owners = batch.conversation[r]
            for i in owners[owners >= 0].unique().tolist():
                e = examples[i]
                assert batch.tokens[r, owners == i].tolist() == e.ids  # whole, in order
                want = [t if m else IGNORE_INDEX for t, m in zip(e.ids, e.mask, strict=True)]
                assert batch.labels[r, owners == i].tolist() == want
                seen.append(i)
    assert sorted(seen[:len(examples)]) == list(range(len(examples)))
    state = source.state_dict()
    nxt = source.next_batch()
    again = SFTSource(examples, seq_len=63, micro_batch=2, seed=4)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch().tokens, nxt.tokens)
    with pytest.raises(ValueError, match="longer than a row"):
        SFTSource(examples, seq_len=8, micro_batch=2)


def test_losses_by_hand(setup):
    tok, model = setup
    examples = chat_examples(tok, [_chat(3), _chat(4, reasoning=False)])
    batch = SFTSource(examples, seq_len=63, micro_batch=1).next_batch()
    logits = model(batch.tokens[:, :-1], return_mtp=False).logits
    nll = torch.nn.functional.cross_entropy(logits[0], batch.labels[0, 1:].clamp(min=0), reduction="none")
    counted = batch.labels[0, 1:] != IGNORE_INDEX
    owner = batch.conversation[0, 1:]
    per_token = nll[counted].mean()
    per_conv = torch.stack([nll[counted & (owner == i)].mean() for i in (0, 1)]).mean()
    with torch.no_grad():
        a, _ = sft_loss()(model, batch)
        b, _ = sft_loss(per_conversation=True)(model, batch)
    torch.testing.assert_close(a, per_token.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, per_conv.detach(), atol=1e-5, rtol=1e-5)
    assert abs(float(a - b)) > 1e-4  # the two averages differ (answers of different lengths)


def test_a_short_sft_run_on_the_trainer_learns(setup, tmp_path):
    tok, base = setup
    model = NemotronHForCausalLM(base.config)
    model.load_state_dict(base.state_dict())
    examples = chat_examples(tok, [_chat(i) for i in range(40)], strip_reasoning=0.1, seed=2)
    cfg = make_cfg(tmp_path, train={"steps": 30, "micro_batch": 4}, data={"seq_len": 63},
                   optim={"lr": 3e-3}, schedule={"warmup_steps": 0},
                   run={"eval_every": 0, "save_every": 0, "log_every": 1})
    source = SFTSource(examples, cfg.data.seq_len, cfg.train.micro_batch, seed=3)
    Trainer(cfg, model=model, train_source=source, loss_fn=sft_loss()).train()
    losses = [json.loads(line)["lm_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"type": "train"' in line]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
