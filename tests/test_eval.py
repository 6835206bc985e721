"""Evaluation: bits per byte per domain against direct cross-entropy, the unigram baseline by hand,
and a short real-corpus training run that beats the unigram baseline (the quickstart's claim)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kinetic.data.loader import BlendedLoader, read_index
from kinetic.data.pack import build_corpus
from kinetic.data.sources import iter_documents
from kinetic.data.tokenizer import save_tokenizer, train_tokenizer
from kinetic.eval.perplexity import evaluate_corpus, model_nll, unigram_nll
from kinetic.model import NemotronHForCausalLM
from kinetic.train import Trainer
from kinetic.train.config import from_dict
from tests.conftest import make_config

FIXTURE = Path(__file__).parent / "fixtures" / "data"
DOMAINS = ("sotu", "python_code", "metamath")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    roots = {name: FIXTURE / name for name in DOMAINS}
    docs = [d for name in DOMAINS for d in iter_documents(name, roots[name])]
    tok_dir = save_tokenizer(train_tokenizer(docs, vocab_size=512), tmp_path_factory.mktemp("tok")).parent
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, DOMAINS, tok_dir, val_fraction=0.1, workers=1, source_roots=roots, progress=False)
    return out


def test_unigram_nll_by_hand():
    train = np.array([0, 0, 1, 2])  # counts +1: [3, 2, 2] over vocab 3 -> p = [3/7, 2/7, 2/7]
    scored = np.array([0, 2])
    assert unigram_nll(train, scored, 3) == pytest.approx(-math.log(3 / 7) - math.log(2 / 7))


def test_model_nll_is_summed_cross_entropy_over_windows():
    model = NemotronHForCausalLM(make_config("dense-moe-1group")).eval()
    tokens = np.random.default_rng(0).integers(0, 96, size=50)
    total, scored = model_nll(model, tokens, seq_len=12, batch_size=3)
    assert scored == 4 * 12  # 4 full windows of 13 tokens, 12 targets each
    ref = 0.0
    with torch.no_grad():
        for i in range(4):
            w = torch.tensor(tokens[i * 12: i * 12 + 13])[None]
            ref += F.cross_entropy(model(w[:, :-1]).logits[0], w[0, 1:], reduction="sum").item()
    assert total == pytest.approx(ref, rel=1e-5)


def test_short_training_beats_the_unigram_baseline(corpus, tmp_path):
    vocab = read_index(corpus)["vocab_size"]
    cfg = from_dict({"model": {"preset": "tiny", "overrides": {"vocab_size": vocab}},
                     "data": {"corpus": str(corpus), "seq_len": 64},
                     "train": {"steps": 80, "micro_batch": 8},
                     "run": {"out_dir": str(tmp_path / "run"), "progress": False, "eval_every": 0,
                             "save_every": 0}})
    src = BlendedLoader(corpus, "train", seq_len=64, batch_size=8)
    val = BlendedLoader(corpus, "val", seq_len=64, batch_size=8)
    trainer = Trainer(cfg, train_source=src, val_source=val)
    before = evaluate_corpus(trainer.model, corpus, seq_len=64)
    trainer.train()
    after = evaluate_corpus(trainer.model, corpus, seq_len=64)
    assert set(after["domains"]) == set(DOMAINS)
    o = after["overall"]
    assert o["bpb"] < o["unigram_bpb"] < before["overall"]["bpb"]
    assert o["unigram_bpb"] == pytest.approx(before["overall"]["unigram_bpb"])  # same tokens scored


def test_eval_command_scores_a_checkpoint_on_the_device_asked(corpus, tmp_path, capsys):
    """``kinetic eval --json``: the numbers evaluate_corpus gives for the same checkpoint; --dtype
    bfloat16 scores in that precision (close to float32); a device that cannot be had is refused."""
    import json

    from kinetic import preset
    from kinetic.cli import main

    vocab = read_index(corpus)["vocab_size"]
    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny").replace(vocab_size=vocab)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    base = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--corpus", str(corpus), "--seq-len", "64",
            "--max-tokens", "2000", "--json"]
    want = evaluate_corpus(model, corpus, seq_len=64, max_tokens=2000)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        assert main([*base, "--device", "cpu", "--dtype", dtype]) == 0
        runs[dtype] = json.loads(capsys.readouterr().out)
    assert runs["float32"]["overall"]["loss"] == pytest.approx(want["overall"]["loss"], rel=1e-5)
    assert runs["bfloat16"]["overall"]["loss"] == pytest.approx(want["overall"]["loss"], rel=2e-2)
    assert runs["bfloat16"]["overall"]["loss"] != runs["float32"]["overall"]["loss"]  # it did round
    with pytest.raises(SystemExit) as err:
        main([*base, "--device", "gpu"])
    assert err.value.code == 2 and "--device gpu is invalid" in capsys.readouterr().err
