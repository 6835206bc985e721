"""``kinetic sft`` end to end on a tiny checkpoint: the checkpoint gains the chat tokens, the loss
falls, every checkpoint carries the tokenizer with the chat tokens and the reasoning template (which
transformers and kinetic read back), a finished run resumes as a no-op, and bad inputs are one-line
errors."""

from __future__ import annotations

import json

import pytest
import torch

import kinetic
from kinetic.data.chat import CHAT_TOKENS, REASONING_TEMPLATE
from kinetic.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from tests.test_data_cli import main


def _chat(i: int) -> dict:
    a, b = 10 + i % 9, 20 + i % 7
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"Answer: {a + b}",
                          "reasoning_content": f"{a} plus {b} is {a + b}."}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = train_tokenizer(["What is 12 + 30? 12 plus 30 is 42. Answer: 42\n" * 40], vocab_size=300)
    torch.manual_seed(0)
    model = kinetic.NemotronHForCausalLM(kinetic.preset("tiny").replace(vocab_size=300))
    model.save_pretrained(root / "base")
    save_tokenizer(tok, root / "base")
    (root / "chats.jsonl").write_text("\n".join(json.dumps(_chat(i)) for i in range(60)) + "\n")
    return root


def test_sft_command_trains_and_writes_self_contained_checkpoints(base, capsys):
    out = base / "run"
    argv = ["sft", "--init-from", str(base / "base"), "--data", str(base / "chats.jsonl"), "--out", str(out),
            "--steps", "30", "--seq-len", "63", "--micro-batch", "4", "--lr", "3e-3", "--save-every", "15"]
    assert main(argv) == 0
    losses = [json.loads(line)["lm_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"type": "train"' in line]
    assert losses[-1] < 0.6 * losses[0], losses
    for step in ("step_000015", "step_000030"):
        ckpt = out / "checkpoints" / step
        tok = load_tokenizer(ckpt)
        assert all(tok.token_to_id(t) is not None for t in CHAT_TOKENS)
        assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"] == REASONING_TEMPLATE
        ids = [tok.token_to_id(t) for t in CHAT_TOKENS]  # after the tokenizer's own (it has 284 tokens)
        assert max(ids) < kinetic.from_pretrained(ckpt).config.vocab_size == 300
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0  # finished: nothing to do
    assert "already finished at step 30" in capsys.readouterr().out


@pytest.mark.parametrize("flags, needle", [
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--strip-reasoning", "1.5"], "--strip-reasoning=1.5 must be in [0, 1]"),
    (["--seq-len", "8"], "longer than a row"),
])
def test_sft_bad_inputs_are_one_line_errors(base, tmp_path, flags, needle, capsys):
    argv = ["sft", "--init-from", str(base / "base"), "--data", str(base / "chats.jsonl"),
            "--out", str(tmp_path / "r"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    assert main(["sft", "--init-from", str(base / "base"), "--data", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "bad.jsonl:1 is not valid JSON" in capsys.readouterr().err


def test_rl_command_trains_and_reports_held_out_accuracy(base, capsys):
    out = base / "rl"
    argv = ["rl", "--init-from", str(base / "base"), "--env", "arithmetic", "--env", "strings",
            "--out", str(out), "--steps", "2", "--group-size", "2", "--prompts", "2", "--max-new-tokens", "6",
            "--eval-problems", "3", "--no-dynamic-sampling"]
    assert main(argv) == 0
    report = json.loads((out / "rl_eval.json").read_text())
    assert set(report["accuracy_before"]) == set(report["accuracy_after"]) == {"arithmetic", "strings"}
    assert report["steps"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("type") == "train"] == [1, 2]
    assert all("reward_mean" in r for r in records if r.get("type") == "train")
    assert (out / "checkpoints" / "step_000002" / "tokenizer.json").is_file()
    assert "held-out problems" in capsys.readouterr().out
    capsys.readouterr()
    assert main([*argv[:3], "--env", "nosuch", "--out", str(out)]) == 2
    assert "unknown environment 'nosuch'" in capsys.readouterr().err

