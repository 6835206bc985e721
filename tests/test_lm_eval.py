"""lm-evaluation-harness against a live server (#23): ``lm_eval`` with ``--model local-completions``
runs the repository's two tasks (kinetic/eval/lm_eval: a log-likelihood multiple-choice task and a
``generate_until`` task over local JSONL files) against the app ``kinetic serve`` runs, on a tiny
model whose checkpoint directory holds the tokenizer files (``tokenizer_backend=huggingface``).
Every choice's log-likelihood equals a plain forward of the model, every generation equals the
engine's greedy answer, and so the accuracies equal kinetic's in-process scoring of the same items.

lm-eval is an optional extra (``pip install lm-eval``); without it the test skips."""

from __future__ import annotations

import copy
import json
import string
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import live_server

from kinetic import NemotronHForCausalLM, preset
from kinetic.data.tokenizer import encode, save_tokenizer, train_tokenizer
from kinetic.infer import Engine, SamplingParams, create_app
from kinetic.infer.server import Limits

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")  # lm-eval's huggingface tokenizer backend
pytest.importorskip("tenacity")  # lm-eval[api], for its API models

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "kinetic" / "eval" / "lm_eval"
MODEL = "tiny-lm-eval"
CONTEXT = 128
MAX_GEN_TOKS = 8  # kinetic_gen.yaml's max_gen_toks


def _items(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A live server, its checkpoint directory (tokenizer files) and a reference engine on a copy of
    the model."""
    texts = [" ".join(f"{d['question']} {' '.join(d.get('choices', [d.get('answer', '')]))}" for d in
                      _items("kinetic_mc") + _items("kinetic_gen"))] * 20
    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size()))
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tokenizer(tok, ckpt)
    assert (ckpt / "tokenizer_config.json").is_file()  # what AutoTokenizer needs for EOS
    ref = Engine(copy.deepcopy(model), tok, max_context=CONTEXT)
    app = create_app(Engine(model, tok, max_context=CONTEXT), MODEL, Limits(max_n=16, max_active=16))
    with live_server(app) as url:
        yield url, ckpt, ref


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into tokens: trailing spaces of the context
    move to the continuation, and the continuation's tokens are those of the whole after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(tok, context + continuation), encode(tok, context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def _loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation | context) from one plain forward of the model."""
    ids = context + continuation
    logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = logits[len(context) - 1:-1].log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


def _normalize(text: str) -> str:
    return text.lower().translate(str.maketrans("", "", string.punctuation))


def test_lm_eval_local_completions_equals_in_process_scoring(served, monkeypatch):
    url, ckpt, ref = served
    monkeypatch.chdir(REPO)  # the task files name their JSONL relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{url}/v1/completions", "model": MODEL, "tokenizer_backend": "huggingface",
                    "tokenizer": str(ckpt), "max_length": CONTEXT, "batch_size": 4, "max_retries": 1},
        tasks=["kinetic_mc", "kinetic_gen"], task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True)
    results, samples = out["results"], out["samples"]

    # multiple choice: per-choice log-likelihoods from a plain forward, the chosen answers, accuracy
    tok, model = ref.tokenizer, ref.model
    correct, correct_norm = [], []
    mc = sorted(samples["kinetic_mc"], key=lambda s: s["doc_id"])
    assert [s["doc"] for s in mc] == _items("kinetic_mc")
    for sample in mc:
        doc = sample["doc"]
        want = [_loglikelihood(model, *_encode_pair(tok, doc["question"], " " + c)) for c in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-4), doc
        correct.append(max(range(len(want)), key=want.__getitem__) == doc["answer"])
        norm = [ll / len(" " + c) for ll, c in zip(want, doc["choices"], strict=True)]
        correct_norm.append(max(range(len(norm)), key=norm.__getitem__) == doc["answer"])
    acc, acc_norm = sum(correct) / len(correct), sum(correct_norm) / len(correct_norm)
    assert results["kinetic_mc"]["acc,none"] == pytest.approx(acc)
    assert results["kinetic_mc"]["acc_norm,none"] == pytest.approx(acc_norm)

    # generate_until: each answer is the engine's greedy answer to the same ids; exact match from it
    gen = sorted(samples["kinetic_gen"], key=lambda s: s["doc_id"])
    matches = []
    for sample in gen:
        doc = sample["doc"]
        prompt = encode(tok, f"Q: {doc['question']}\nA:")
        want = ref.generate([prompt], SamplingParams(max_new_tokens=MAX_GEN_TOKS, temperature=0,
                                                     stop_strings=("\n", "<eos>")))[0].text
        assert sample["resps"][0][0] == want, doc
        matches.append(_normalize(want.lstrip()) == _normalize(doc["answer"]))
    assert results["kinetic_gen"]["exact_match,strip"] == pytest.approx(sum(matches) / len(matches))
    print(f"lm-eval: kinetic_mc acc {acc:.3f} acc_norm {acc_norm:.3f}, kinetic_gen exact_match "
          f"{sum(matches) / len(matches):.3f}")
