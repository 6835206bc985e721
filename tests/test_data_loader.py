"""Blended loader: deterministic for a seed, resumable exactly from its state, disjoint across ranks
of one global stream, blending by weight, and clear errors for unknown domains or mismatched state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kinetic.data.loader import BlendedLoader
from kinetic.data.pack import build_corpus
from kinetic.data.sources import iter_documents
from kinetic.data.tokenizer import save_tokenizer, train_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "data"
DOMAINS = ("sotu", "python_code", "metamath")
ROOTS = {name: FIXTURE / name for name in DOMAINS}
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = [d for name in DOMAINS for d in iter_documents(name, ROOTS[name])]
    tok_dir = save_tokenizer(train_tokenizer(docs, vocab_size=500), tmp_path_factory.mktemp("tok")).parent
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, DOMAINS, tok_dir, val_fraction=0.1, workers=1, source_roots=ROOTS, progress=False)
    return out


def draw(loader, n):
    return [loader.next_batch() for _ in range(n)]


def domain_tokens(corpus, name, split="train") -> np.ndarray:
    index = json.loads((corpus / "index.json").read_text())
    return np.concatenate([np.fromfile(corpus / s["file"], dtype=index["dtype"])
                           for s in index["domains"][name][split]["shards"]]).astype(np.int64)


def test_batches_are_int64_windows(corpus):
    batch = BlendedLoader(corpus, seq_len=SEQ, batch_size=4).next_batch()
    assert batch.shape == (4, SEQ + 1) and batch.dtype == torch.int64
    assert batch.min() >= 0 and batch.max() < 500


def test_deterministic_for_a_seed(corpus):
    a = draw(BlendedLoader(corpus, seq_len=SEQ, batch_size=4, seed=7), 5)
    b = draw(BlendedLoader(corpus, seq_len=SEQ, batch_size=4, seed=7), 5)
    c = draw(BlendedLoader(corpus, seq_len=SEQ, batch_size=4, seed=8), 5)
    assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    assert not all(x.equal(y) for x, y in zip(a, c, strict=True))


def test_resume_continues_exactly(corpus):
    weights = {"sotu": 1.0, "python_code": 2.0, "metamath": 1.0}
    loader = BlendedLoader(corpus, weights=weights, seq_len=SEQ, batch_size=3, seed=1)
    draw(loader, 40)  # long enough to wrap into a second epoch of the smallest domain
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint would store it
    expected = draw(loader, 30)
    resumed = BlendedLoader(corpus, weights=weights, seq_len=SEQ, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert resumed.tokens_served() == state["tokens_served"]
    assert all(x.equal(y) for x, y in zip(draw(resumed, 30), expected, strict=True))
    assert resumed.tokens_served() == loader.tokens_served()


def test_ranks_split_one_global_stream(corpus):
    single = draw(BlendedLoader(corpus, seq_len=SEQ, batch_size=6, seed=3), 8)
    ranks = [draw(BlendedLoader(corpus, seq_len=SEQ, batch_size=2, seed=3, rank=r, world_size=3), 8)
             for r in range(3)]
    for step in range(8):
        assert torch.cat([ranks[r][step] for r in range(3)]).equal(single[step])
    rows = [tuple(row.tolist()) for r in range(3) for batch in ranks[r] for row in batch]
    assert len(set(rows)) == len(rows)  # no sample served twice (one epoch is longer than 48 windows)


def test_resume_with_another_world_size(corpus):
    loader = BlendedLoader(corpus, seq_len=SEQ, batch_size=4, seed=0)
    draw(loader, 3)
    state, expected = loader.state_dict(), loader.next_batch()
    halves = []
    for r in range(2):
        part = BlendedLoader(corpus, seq_len=SEQ, batch_size=2, seed=0, rank=r, world_size=2)
        part.load_state_dict(state)
        halves.append(part.next_batch())
    assert torch.cat(halves).equal(expected)


def test_blend_follows_weights_and_counts_tokens(corpus):
    loader = BlendedLoader(corpus, weights={"sotu": 3, "python_code": 1, "metamath": 0}, seq_len=SEQ,
                           batch_size=4, seed=0)
    draw(loader, 10)
    assert loader.domains == ["sotu", "python_code"]
    assert loader.tokens_served() == {"sotu": 30 * SEQ, "python_code": 10 * SEQ}
    assert loader.global_tokens_served() == loader.tokens_served()


def test_rows_are_windows_of_their_domain_and_an_epoch_covers_each_once(corpus):
    tokens = domain_tokens(corpus, "sotu")
    loader = BlendedLoader(corpus, weights={"sotu": 1}, seq_len=SEQ, batch_size=1, seed=5)
    n = (len(tokens) - 1) // SEQ  # one shard
    start_of = {tokens[s: s + SEQ + 1].tobytes(): s for s in range(0, len(tokens) - SEQ, SEQ)}
    starts = [start_of[loader.next_batch()[0].numpy().tobytes()] for _ in range(n)]
    assert sorted(starts) == list(range(0, n * SEQ, SEQ))
    assert loader.epochs() == {"sotu": 1.0}


def test_val_split(corpus):
    val = BlendedLoader(corpus, split="val", seq_len=8, batch_size=2, seed=0)
    tokens = domain_tokens(corpus, "sotu", "val")
    first = draw(val, 6)
    rows = [r for b in first for r in b]
    val.reset()  # every validation pass can see the same batches
    assert all(x.equal(y) for x, y in zip(draw(val, 6), first, strict=True))
    assert any(any(np.array_equal(tokens[s: s + 9], r.numpy()) for s in range(0, len(tokens) - 8, 8))
               for r in rows)


def test_errors_name_the_problem(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"unknown domain\(s\) 'code'.*sotu, python_code, metamath"):
        BlendedLoader(corpus, weights={"code": 1.0})
    with pytest.raises(ValueError, match="weights must be"):
        BlendedLoader(corpus, weights={"sotu": -1.0})
    with pytest.raises(ValueError, match="'sotu' has too few val tokens"):
        BlendedLoader(corpus, split="val", weights={"sotu": 1}, seq_len=100_000)
    with pytest.raises(ValueError, match="rank=2"):
        BlendedLoader(corpus, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="kinetic data build"):
        BlendedLoader(tmp_path)
    state = BlendedLoader(corpus, seq_len=SEQ, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        BlendedLoader(corpus, seq_len=SEQ * 2, seed=0).load_state_dict(state)
