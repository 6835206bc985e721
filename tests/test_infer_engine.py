"""Generation engine: batched prompts equal solo runs and ``model.generate``; seeded sampling is
reproducible; top-k/top-p filters; stop tokens/strings; UTF-8-safe streaming; limits; chat
templates (built-in and Jinja); the ``generate``/``chat`` commands."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kinetic import NemotronHForCausalLM, preset
from kinetic.cli.infer import add_chat_args, add_generate_args, cmd_chat, cmd_generate
from kinetic.data.tokenizer import (
    ASSISTANT_ID,
    EOS_ID,
    SYSTEM_ID,
    USER_ID,
    encode,
    save_tokenizer,
    train_tokenizer,
)
from kinetic.errors import UserError
from kinetic.infer import ChatTemplate, Engine, SamplingParams
from kinetic.infer.engine import GenerationSequence
from kinetic.infer.sampling import sample, top_k_filter, top_p_filter

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "def add(a, b):\n    return a + b\n" * 20,
         "héllo wörld, naïve café ünïcode 世界 🙂 " * 20]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def engine(tok):
    torch.manual_seed(0)
    model = NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size()))
    return Engine(model, tok)


@pytest.fixture(scope="module")
def checkpoint(engine, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    engine.model.save_pretrained(path)
    save_tokenizer(tok, path)
    return path


# ---------------------------------------------------------------------- batching and determinism
def _same(a, b) -> None:
    """Two lists of results with equal tokens and text; log-probs equal up to the float rounding of
    a different batch size."""
    assert [(r.token_ids, r.text, r.finish_reason, r.usage) for r in a] == \
        [(r.token_ids, r.text, r.finish_reason, r.usage) for r in b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(torch.tensor([t.logprob for t in x.tokens]),
                                   torch.tensor([t.logprob for t in y.tokens]), atol=1e-5, rtol=0)


def test_batched_equals_one_by_one_and_model_generate(engine, tok):
    prompts = ["The quick brown", "def add(a, b):\n", "w", encode(tok, "héllo wörld 世界")]
    batched = engine.generate(prompts, GREEDY)
    _same(batched, [engine.generate([p], GREEDY)[0] for p in prompts])
    for prompt, res in zip(prompts, batched, strict=True):
        ids = engine.encode(prompt)
        ref = engine.model.generate(torch.tensor([ids]), max_new_tokens=12)[0, len(ids):].tolist()
        if EOS_ID in ref:  # model.generate pads after EOS; the engine stops there
            ref = ref[:ref.index(EOS_ID) + 1]
        assert res.token_ids == ref
        assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == len(ref)
        assert res.finish_reason == ("stop" if ref[-1] == EOS_ID else "length")


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=100, top_p=0.95, seed=123)
    a, b = engine.generate(["The quick", "def "], params)
    assert engine.generate(["The quick", "def "], params) == [a, b]
    _same(engine.generate(["def "], params), [b])
    other = engine.generate(["The quick"], replace(params, seed=124))[0]
    assert other.token_ids != a.token_ids
    _same(engine.generate(["def ", "The quick"], [params, replace(params, seed=124)]), [b, other])


def test_top_k_one_equals_greedy(engine):
    prompts = ["The quick brown", "def add("]
    sampled = engine.generate(prompts, replace(GREEDY, temperature=0.7, top_k=1, seed=5))
    assert [r.token_ids for r in sampled] == [r.token_ids for r in engine.generate(prompts, GREEDY)]


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(logits > -math.inf).flatten().tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.1, 0.5, 0.15, 0.25]).log()  # sorted: 1 (.5), 3 (.25), 2 (.15), 0 (.1)
    assert _kept(top_p_filter(logits, 1e-6)) == {1}
    assert _kept(top_p_filter(logits, 0.45)) == {1}
    assert _kept(top_p_filter(logits, 0.6)) == {1, 3}
    assert _kept(top_p_filter(logits, 0.8)) == {1, 3, 2}
    assert _kept(top_p_filter(logits, 0.95)) == {0, 1, 2, 3}
    assert _kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    rows = top_p_filter(torch.stack([logits, logits.flip(0)]), 0.6)  # each row on its own
    assert _kept(rows[0]) == {1, 3} and _kept(rows[1]) == {2, 0}
    draws = {int(sample(logits[None], [SamplingParams(top_p=0.6)], [(0, i)]).tokens[0]) for i in range(200)}
    assert draws == {1, 3}


def test_top_k_filter():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert _kept(top_k_filter(logits, 2)[0]) == {1, 3}
    assert _kept(top_k_filter(logits, 0)[0]) == {0, 1, 2, 3}
    assert _kept(top_k_filter(logits, 9)[0]) == {0, 1, 2, 3}


# ---------------------------------------------------------------------- stopping and streaming text
def _feed(engine, ids: list[int], **params):
    """Advance a sequence through ``ids`` as if the model had sampled them; (deltas, sequence)."""
    p = SamplingParams(max_new_tokens=len(ids), **params)
    stops = (() if p.ignore_eos else engine.eos_token_ids) + p.stop_token_ids
    seq = GenerationSequence(engine.encode("x"), p, stops, engine.max_context, engine.tokenizer)
    deltas = []
    for t in ids:
        deltas.append(seq.advance(t))
        if seq.finished:
            break
    return deltas, seq


def test_stream_emits_only_complete_utf8_characters(engine, tok):
    text = "héllo wörld 世界 🙂 naïve; 日本語 ☃ 🦀"  # the last three are unseen: split into bytes
    deltas, seq = _feed(engine, encode(tok, text))
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == seq.result().text == text
    assert any(d.text == "" for d in deltas)  # some tokens held a partial character back
    assert [d.finish_reason for d in deltas][-2:] == [None, "length"]


def test_stop_strings_cut_the_text_across_tokens(engine, tok):
    text = "The quick brown fox jumps over the lazy dog."
    deltas, seq = _feed(engine, encode(tok, text), stop_strings=("x jum", "never"))
    assert seq.result().text == "The quick brown fo" == "".join(d.text for d in deltas)
    assert seq.finish_reason == "stop" and deltas[-1].finish_reason == "stop"
    deltas, seq = _feed(engine, encode(tok, text), stop_strings=("dog!",))  # a prefix that never completes
    assert "".join(d.text for d in deltas) == text and seq.finish_reason == "length"


def test_stop_tokens_and_eos(engine, tok):
    ids = encode(tok, "def add")
    _, seq = _feed(engine, [*ids, EOS_ID, *ids])
    assert seq.result().text == "def add" and seq.finish_reason == "stop"
    assert seq.result().token_ids == [*ids, EOS_ID]
    _, seq = _feed(engine, [*ids, EOS_ID, *ids], ignore_eos=True)
    assert seq.result().text == "def adddef add" and seq.finish_reason == "length"
    _, seq = _feed(engine, [*ids, USER_ID, *ids], stop_token_ids=(USER_ID,))
    assert seq.result().text == "def add" and seq.finish_reason == "stop"


def test_generated_stop_string_and_stream_match_generate(engine):
    full = engine.generate(["The quick brown"], replace(GREEDY, max_new_tokens=24))[0]
    pieces = (full.text[i:i + 2] for i in range(3, len(full.text) - 2))
    stop = next(p for p in pieces if "\ufffd" not in p)
    cut = engine.generate(["The quick brown"], replace(GREEDY, max_new_tokens=24, stop_strings=(stop,)))[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    params = replace(GREEDY, max_new_tokens=24, stop_strings=(stop,))
    deltas = list(engine.stream("The quick brown", params))
    assert "".join(d.text for d in deltas) == cut.text and deltas[-1].finish_reason == "stop"
    assert sum(len(d.token_ids) for d in deltas) == len(cut.token_ids)


def test_context_limit_and_bad_inputs(engine, tok):
    small = Engine(engine.model, tok, max_context=10)
    res = small.generate([list(range(6, 12))], replace(GREEDY, max_new_tokens=100, ignore_eos=True))[0]
    assert res.finish_reason == "length" and res.usage.completion_tokens == 4
    with pytest.raises(ValueError, match="context limit is 10"):
        small.start(list(range(6, 16)))
    with pytest.raises(ValueError, match="empty"):
        engine.start("")
    with pytest.raises(ValueError, match="token ids"):
        engine.start([1, 10**6])
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate("The quick")
    assert engine.generate(["a"], replace(GREEDY, max_new_tokens=0))[0].token_ids == []
    for bad in (dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_k=-2), dict(stop_strings=("",)), dict(max_new_tokens=True), dict(seed="1"),
                dict(min_p=1.5), dict(logprobs=-1), dict(prompt_logprobs=2.0)):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}=.* is invalid"):
            SamplingParams(**bad)


# ---------------------------------------------------------------------- chat templates
def test_builtin_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "<eos>"}]}]
    e = lambda s: encode(tok, s)
    assert ChatTemplate().encode(tok, messages) == [
        SYSTEM_ID, *e("Be brief."), EOS_ID, USER_ID, *e("Hi"), EOS_ID, ASSISTANT_ID, *e("Hello!"), EOS_ID,
        USER_ID, *e("<eos>"), EOS_ID, ASSISTANT_ID]  # typed "<eos>" stays text: no forged turn
    assert EOS_ID not in e("<eos>")
    assert ChatTemplate().encode(tok, messages[:2], add_generation_prompt=False)[-1] == EOS_ID
    assert ChatTemplate().encode(tok, [{"role": "developer", "content": "x"}])[0] == SYSTEM_ID
    with pytest.raises(ValueError, match="role"):
        ChatTemplate().encode(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="at least one"):
        ChatTemplate().encode(tok, [])


JINJA = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
         "{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_jinja_chat_template_from_tokenizer_config(tok, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": JINJA, "bos_token": {"content": "<bos>"}, "eos_token": "<|system|>"}))
    template = ChatTemplate.from_pretrained(tmp_path)
    assert not template.is_builtin
    messages = [{"role": "user", "content": " Hi "}]
    assert template.render(messages) == "<bos><|user|>\nHi<|system|>\n<|assistant|>\n"
    assert template.encode(tok, messages) == [1, USER_ID, *encode(tok, "\nHi"), SYSTEM_ID, *encode(tok, "\n"),
                                              ASSISTANT_ID, *encode(tok, "\n")]
    assert template.stop_token_ids(tok) == [SYSTEM_ID]
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no chat here') }}")
    with pytest.raises(ValueError, match="no chat here"):  # the .jinja file wins over the config key
        ChatTemplate.from_pretrained(tmp_path).encode(tok, messages)
    assert ChatTemplate.from_pretrained(tmp_path / "missing").is_builtin


# ---------------------------------------------------------------------- commands
def _args(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_cmd_generate(engine, checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint), "--prompt", "The quick", "--prompt", "def add(",
            "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]
    assert cmd_generate(_args(add_generate_args, argv)) == 0
    out = capsys.readouterr().out
    for prompt in ("The quick", "def add("):
        text = engine.generate([prompt], replace(GREEDY, max_new_tokens=8))[0].text
        assert f"--- {prompt!r}\n{prompt}{text}\n" in out
    assert cmd_generate(_args(add_generate_args, argv[:4] + ["--chat", "--max-new-tokens", "4"])) == 0
    capsys.readouterr()
    # the same greedy text without speculation; the budget is printed before the prompt runs
    assert cmd_generate(_args(add_generate_args, argv + ["--no-speculative", "--show-budget"])) == 0
    out = capsys.readouterr().out
    text = engine.generate(["The quick"], replace(GREEDY, max_new_tokens=8))[0].text
    assert f"--- 'The quick'\nThe quick{text}\n" in out and "cache budget for" in out
    assert "speculative decoding:" not in out
    with pytest.raises(UserError, match="empty"):
        cmd_generate(_args(add_generate_args, ["--checkpoint", str(checkpoint), "--prompt", ""]))
    # --dtype: the engine's weights in that precision (bfloat16 runs on the CPU too)
    assert cmd_generate(_args(add_generate_args, argv[:4] + ["--dtype", "bfloat16", "--device", "cpu",
                                                             "--max-new-tokens", "4"])) == 0
    assert "--- 'The quick'\nThe quick" in capsys.readouterr().out


def test_device_and_dtype_flags(checkpoint, monkeypatch):
    """--device auto takes the GPU when one is visible, else the CPU; a device that cannot be had is
    an error naming --device and the way out, before the checkpoint is read."""
    from kinetic.cli.infer import device_options

    base = ["--checkpoint", str(checkpoint), "--prompt", "x"]
    got = device_options(_args(add_generate_args, base + ["--dtype", "float16", "--device", "cpu"]))
    assert got == {"device": torch.device("cpu"), "dtype": torch.float16}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_options(_args(add_generate_args, base))["device"] == torch.device("cpu")  # auto
    with pytest.raises(UserError, match=r"--device cuda needs a GPU.*use --device cpu or auto"):
        cmd_generate(_args(add_generate_args, base + ["--device", "cuda"]))
    with pytest.raises(UserError, match=r"--device gpu is invalid: use 'auto'"):
        cmd_generate(_args(add_generate_args, base + ["--device", "gpu"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_options(_args(add_generate_args, base))["device"] == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"--device cuda:1 asks for GPU 1, but this machine shows 1 \("):
        device_options(_args(add_generate_args, base + ["--device", "cuda:1"]))
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        _args(add_generate_args, base + ["--dtype", "fp8"])


def test_python_m_kinetic_cli_reports_user_errors_in_one_line(tmp_path):
    """``python -m kinetic.cli`` (how torchrun starts kinetic): an error raised in a subcommand's module
    is the one-line usage error of the ``kinetic`` script, exit status 2, not a traceback."""
    done = subprocess.run([sys.executable, "-m", "kinetic.cli", "generate", "--checkpoint", str(tmp_path),
                           "--prompt", "x", "--device", "gpu"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "kinetic generate: error: --device gpu is invalid" in done.stderr
    assert "Traceback" not in done.stderr


def test_cmd_chat(checkpoint, capsys, monkeypatch):
    lines = iter(["hello there", "", "/reset", "again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = _args(add_chat_args, ["--checkpoint", str(checkpoint), "--max-new-tokens", "4",
                                 "--system", "Be brief", "--device", "cpu"])
    assert cmd_chat(args) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "(history cleared)" in out


def test_cli_inputs_that_used_to_fail(checkpoint, capsys, monkeypatch):
    """#24: a tiny temperature is greedy (it crashed sampling), errors name the flag the user typed
    (not SamplingParams.max_new_tokens), --port 70000 is refused in one line, and a non-UTF-8 chat
    line is reported and the chat goes on (it ended the chat with a traceback)."""
    base = ["--checkpoint", str(checkpoint), "--prompt", "The quick", "--max-new-tokens", "6",
            "--device", "cpu"]
    assert cmd_generate(_args(add_generate_args, base + ["--temperature", "1e-45"])) == 0
    tiny = capsys.readouterr().out
    assert cmd_generate(_args(add_generate_args, base + ["--temperature", "0"])) == 0
    assert capsys.readouterr().out == tiny
    for flags, message in ((["--max-new-tokens", "-1"], r"^--max-new-tokens=-1 is invalid"),
                           (["--top-p", "0"], r"^--top-p=0.0 is invalid"),
                           (["--min-p", "2"], r"^--min-p=2.0 is invalid")):
        with pytest.raises(UserError, match=message):
            cmd_generate(_args(add_generate_args, base + flags))
    from kinetic.cli.infer import add_serve_args, cmd_serve

    for port in ("70000", "-1"):
        with pytest.raises(UserError, match=rf"--port {port} is not a TCP port"):
            cmd_serve(_args(add_serve_args, ["--checkpoint", str(checkpoint), "--port", port]))

    def lines():
        yield "hello"
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    feed = lines()
    rest = iter(["again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(feed, None) or next(rest))
    args = _args(add_chat_args, ["--checkpoint", str(checkpoint), "--max-new-tokens", "3", "--device", "cpu"])
    assert cmd_chat(args) == 0
    out = capsys.readouterr().out
    assert "error: the input is not valid UTF-8" in out and out.count("assistant> ") == 2


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_engine_equals_plain(engine, tok, compile_backend):
    """``compile_decode`` (``--compile``) on CPU: the plain decode step runs through torch.compile on a
    batch padded to a power of two whose padding rows write nothing -- even while a long prompt is
    prefilled, in chunks, in the slot after the running ones -- and greedy answers equal the eager
    engine's; the compiled step is kept on the model and reused."""
    engine.model.__dict__.pop("_compiled_decode_step", None)  # compiled by another backend
    prompts = ["The quick brown", "def add(a, b):\n", "The lazy dog jumps over the quick brown fox again"]
    params = replace(GREEDY, max_new_tokens=10, ignore_eos=True)
    eager = Engine(engine.model, tok, speculative=False, prefill_chunk=3)
    want = [r.token_ids for r in eager.generate(prompts, params)]
    compiled = Engine(engine.model, tok, compile_decode=True, prefill_chunk=3)
    assert not compiled.speculative
    assert [r.token_ids for r in compiled.generate(prompts, params)] == want
    step = engine.model.__dict__["_compiled_decode_step"]
    assert [r.token_ids for r in compiled.generate(prompts[:1], params)] == want[:1]
    assert engine.model.__dict__["_compiled_decode_step"] is step
    with pytest.raises(ValueError, match="compile_decode"):
        Engine(engine.model, tok, compile_decode=True, speculative=True)
