"""Packing: size caps and validation splits are deterministic, shards decode back to the documents,
and the bytes on disk do not depend on the number of worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kinetic.data.pack import build_corpus, load_domain, select_documents, split_documents, token_dtype
from kinetic.data.sources import iter_documents
from kinetic.data.tokenizer import EOS_ID, decode, load_tokenizer, save_tokenizer, train_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "data"
DOMAINS = ("sotu", "python_code", "python_docs", "metamath")
ROOTS = {name: FIXTURE / name for name in DOMAINS}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    docs = [d for name in DOMAINS for d in iter_documents(name, ROOTS[name])]
    return save_tokenizer(train_tokenizer(docs, vocab_size=700), tmp_path_factory.mktemp("tok")).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("corpus")
    index = build_corpus(out, DOMAINS, tokenizer_dir, max_bytes_per_domain=60_000, val_fraction=0.1,
                         workers=1, source_roots=ROOTS, progress=False)
    return out, index


def test_select_documents_caps_bytes_deterministically():
    docs = list(iter_documents("sotu", ROOTS["sotu"]))
    assert select_documents(docs) == docs
    picked = select_documents(docs, 30_000)
    assert sum(len(d.encode()) for d in picked) <= 30_000
    assert picked == select_documents(list(docs), 30_000)
    # kept in the original order, whole documents except the last one, which is cut at a line break
    positions = [next(i for i, d in enumerate(docs) if d.startswith(p[:200])) for p in picked]
    assert positions == sorted(positions)
    assert sum(p in docs for p in picked) >= len(picked) - 1
    with pytest.raises(ValueError, match="max_bytes=0"):
        select_documents(docs, 0)


def test_split_is_deterministic_disjoint_and_never_empty():
    docs = list(iter_documents("python_docs", ROOTS["python_docs"]))
    train, val = split_documents(docs, 0.2)
    assert (train, val) == split_documents(list(docs), 0.2)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 0 < sum(len(d) for d in val) <= 0.2 * sum(len(d) for d in docs)
    assert len(split_documents(docs[:2], 0.01)[1]) == 1  # at least one validation document
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="val_fraction=1"):
        split_documents(docs, 1)


def test_index_and_shards(corpus, tokenizer_dir):
    out, index = corpus
    assert index == json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 700 and index["eos_id"] == EOS_ID
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert list(index["domains"]) == list(DOMAINS)
    for entry in index["domains"].values():
        assert entry["license"] in ("PSF-2.0", "CC0-1.0")
        assert entry["train"]["documents"] > 0 and entry["val"]["documents"] > 0
        assert entry["train"]["bytes"] + entry["val"]["bytes"] <= 60_000
        for split in ("train", "val"):
            for shard in entry[split]["shards"]:
                assert (out / shard["file"]).stat().st_size == 2 * shard["tokens"]


def test_shards_decode_to_the_documents(corpus):
    out, index = corpus
    tok = load_tokenizer(out)
    for name in DOMAINS:
        train, val = load_domain(name, ROOTS[name], max_bytes=60_000, val_fraction=0.1)
        for split, docs in (("train", train), ("val", val)):
            ids = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16)
                                  for s in index["domains"][name][split]["shards"]])
            assert ids[-1] == EOS_ID and (ids == EOS_ID).sum() == len(docs)
            pieces = np.split(ids, np.flatnonzero(ids == EOS_ID) + 1)[:-1]
            assert [decode(tok, p[:-1].tolist()) for p in pieces] == docs


def test_worker_processes_give_identical_bytes(corpus, tokenizer_dir, tmp_path):
    out, _ = corpus
    index = build_corpus(tmp_path, ["sotu", "metamath"], tokenizer_dir, max_bytes_per_domain=60_000,
                         val_fraction=0.1, workers=2, source_roots=ROOTS, progress=False)
    for name in ("sotu", "metamath"):
        for shard in index["domains"][name]["train"]["shards"] + index["domains"][name]["val"]["shards"]:
            assert (tmp_path / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()


def test_small_shards_and_rebuild(tokenizer_dir, tmp_path):
    index = build_corpus(tmp_path, ["sotu"], tokenizer_dir, source_roots=ROOTS, workers=1, shard_tokens=5000,
                         progress=False)
    shards = index["domains"]["sotu"]["train"]["shards"]
    assert len(shards) > 1
    assert sum(s["documents"] for s in shards) == index["domains"]["sotu"]["train"]["documents"]
    again = build_corpus(tmp_path, ["python_docs"], tokenizer_dir, source_roots=ROOTS, workers=1,
                         progress=False)
    assert list(again["domains"]) == ["python_docs"] and not (tmp_path / "sotu").exists()
    (tmp_path / "index.json").unlink()  # as if that build had been interrupted
    build_corpus(tmp_path, ["sotu"], tokenizer_dir, source_roots=ROOTS, workers=1, progress=False)
    assert not (tmp_path / "python_docs").exists() and (tmp_path / "index.json").is_file()


def test_refuses_a_directory_that_is_not_a_corpus(tokenizer_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_corpus(tmp_path, ["sotu"], tokenizer_dir, source_roots=ROOTS, workers=1, progress=False)
    with pytest.raises(ValueError, match="unknown domain 'prose'"):
        build_corpus(tmp_path / "new", ["prose"], tokenizer_dir)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
