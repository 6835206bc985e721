"""Packing: documents -> token shards on disk, one directory per domain, with a validation split.

Layout of a corpus directory (what :class:`kinetic.data.loader.BlendedLoader` reads)::

    index.json               format, dtype, vocab size, tokenizer hash, per-domain splits and shards
    tokenizer.json           a copy of the tokenizer the shards were made with
    DOMAIN/train_000.bin     raw token ids (uint16 when every id fits, else uint32), documents
    DOMAIN/val_000.bin       back to back, each followed by <eos>

The build is deterministic: the same sources, caps and tokenizer give byte-identical shards for any
number of worker processes. Two choices make that so:

* a size cap (``max_bytes_per_domain``) keeps the documents with the smallest content hash, so a
  2 MB sample of the State of the Union spans 1790-2021 instead of stopping in 1850; the document
  that crosses the cap is cut at a line break, so a domain holds at most ``max_bytes`` bytes;
* the validation split takes documents in the order of a second content hash until it holds
  ``val_fraction`` of the bytes (at least one document when a domain has two or more).

Documents are tokenized in a ``multiprocessing`` pool (spawn, so it is safe everywhere; each worker
loads the tokenizer from its file), or in-process for small builds where the tokenizer's own threads
are faster than starting processes (see ``POOL_MIN_BYTES``), and written in their original order.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kinetic.data.sources import SOURCES, get_source, iter_documents
from kinetic.data.tokenizer import EOS_ID, TOKENIZER_FILE, encode_batch, load_tokenizer

INDEX_FILE = "index.json"
BUILD_MARKER = ".kinetic-corpus"  # written first, so an interrupted build can be rebuilt in place
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 18  # text per task sent to a worker: big enough to amortize pickling, small for balance
# Below this much text, ``workers=None`` tokenizes in-process: encode_batch already uses every core
# through the Rust thread pool, and each spawned worker pays a start-up import of torch. No file in
# benchmarks/ times this; compare `kinetic data build --workers 1` and `--workers N` (docs/performance.md).
POOL_MIN_BYTES = 64 * 10**6


# ---------------------------------------------------------------------- selecting documents
def _hash(text: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=salt).digest(), "big")


def _cut(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` within ``max_bytes`` UTF-8 bytes, ending at a line break if any."""
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    line_end = head.rfind("\n")
    return head[: line_end + 1] if line_end >= 0 else head


def select_documents(documents: Iterable[str], max_bytes: int | None = None) -> list[str]:
    """All documents, or a deterministic sample of at most ``max_bytes`` UTF-8 bytes (smallest content
    hash first; the one that crosses the cap is cut at a line break), in their original order."""
    docs = list(documents)
    if max_bytes is None:
        return docs
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive (or None for no cap)")
    kept: dict[int, str] = {}
    total = 0
    for i in sorted(range(len(docs)), key=lambda i: _hash(docs[i], b"select")):
        size = len(docs[i].encode("utf-8"))
        if total + size > max_bytes:
            part = _cut(docs[i], max_bytes - total)
            if part.strip():
                kept[i] = part
            break
        kept[i] = docs[i]
        total += size
    return [kept[i] for i in sorted(kept)]


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): val gets documents in content-hash order while they fit in ``val_fraction`` of
    the bytes, and at least one (the smallest) when there are two or more documents."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    sizes = [len(d.encode("utf-8")) for d in docs]
    target = val_fraction * sum(sizes)
    val: set[int] = set()
    used = 0
    for i in sorted(range(len(docs)), key=lambda i: _hash(docs[i], b"val-split")):
        if used + sizes[i] <= target:
            val.add(i)
            used += sizes[i]
    if not val and val_fraction > 0 and len(docs) >= 2:
        val.add(min(range(len(docs)), key=lambda i: (sizes[i], i)))
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def load_domain(name: str, root: str | Path | None = None, max_bytes: int | None = None,
                val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """(train, val) documents of one domain, capped and split as :func:`build_corpus` does (the
    tokenizer trainer uses the same call, so it never sees validation text)."""
    return split_documents(select_documents(iter_documents(name, root), max_bytes), val_fraction)


# ---------------------------------------------------------------------- tokenizing in workers
_worker_tok = None


def _init_worker(tokenizer_file: str, in_pool: bool = True) -> None:
    global _worker_tok
    if in_pool:  # the pool is the parallelism: no extra Rust threads inside each worker
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = load_tokenizer(tokenizer_file)


def _encode_chunk(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of ``docs``, each followed by <eos>, as one uint32 array; tokens per document)."""
    ids = encode_batch(_worker_tok, docs)
    lengths = np.array([len(seq) + 1 for seq in ids], dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.uint32)
    for seq, end in zip(ids, np.cumsum(lengths), strict=True):
        out[end - len(seq) - 1: end - 1] = seq
        out[end - 1] = EOS_ID
    return out, lengths


def _chunks(docs: list[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _make_encoder(tokenizer_file: Path, workers: int):
    """(map function over chunks, close function): a spawn pool, or in-process when workers <= 1."""
    if workers <= 1:
        _init_worker(str(tokenizer_file), in_pool=False)
        return (lambda chunks: map(_encode_chunk, chunks)), (lambda: None)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_file),))
    return (lambda chunks: pool.imap(_encode_chunk, chunks)), pool.terminate


# ---------------------------------------------------------------------- writing shards
class _ShardWriter:
    """Appends whole documents to DOMAIN/SPLIT_NNN.bin, starting a new shard past ``shard_tokens``."""

    def __init__(self, out_dir: Path, domain: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.domain, self.split = out_dir, domain, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (``lengths`` tokens each, back to back in ``ids``); a shard ends only
        between documents."""
        start = 0
        for n in lengths.tolist():
            if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            self.file.write(ids[start: start + n].astype(self.dtype).tobytes())
            self.shards[-1]["tokens"] += n
            self.shards[-1]["documents"] += 1
            start += n

    def _open(self) -> None:
        self.close()
        rel = f"{self.domain}/{self.split}_{len(self.shards):03d}.bin"
        self.shards.append({"file": rel, "tokens": 0, "documents": 0})
        self.file = open(self.out_dir / rel, "wb")  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _clear_previous(out_dir: Path) -> None:
    """Remove an earlier (finished or interrupted) build in ``out_dir``; refuse to touch a directory
    that is not a corpus."""
    index, marker = out_dir / INDEX_FILE, out_dir / BUILD_MARKER
    if index.is_file() or marker.is_file():
        names = set(SOURCES)
        if index.is_file():
            names |= set(json.loads(index.read_text()).get("domains", {}))
        for name in names:
            shutil.rmtree(out_dir / name, ignore_errors=True)
        index.unlink(missing_ok=True)
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty and holds no {INDEX_FILE}; "
                              "choose a new or empty directory for the corpus")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _tokenizer_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_corpus(out_dir: str | Path, domains: Iterable[str], tokenizer_dir: str | Path,
                 max_bytes_per_domain: int | None = None, val_fraction: float = 0.05,
                 workers: int | None = None, source_roots: Mapping[str, str | Path] | None = None,
                 shard_tokens: int = 100_000_000, progress: bool | None = None) -> dict:
    """Tokenize ``domains`` into ``out_dir`` and return the index (also written to index.json).

    ``source_roots`` points a domain's loader at another copy of its files (see
    :mod:`kinetic.data.sources`); ``workers=None`` picks in-process tokenization for builds under
    ``POOL_MIN_BYTES`` and a pool of one process per CPU above; ``progress=None`` shows a
    bar only on a terminal. The domains must be available: filter with
    :func:`kinetic.data.sources.available` first to skip missing ones with a warning."""
    domains = list(domains)
    if not domains:
        raise ValueError("no domains to build; see kinetic.data.sources.SOURCES for the choices")
    for name in domains:
        get_source(name)  # ValueError naming the unknown domain
    out_dir, roots = Path(out_dir), dict(source_roots or {})
    tok_file = Path(tokenizer_dir) / TOKENIZER_FILE if Path(tokenizer_dir).is_dir() else Path(tokenizer_dir)
    vocab_size = load_tokenizer(tok_file).get_vocab_size()
    dtype = token_dtype(vocab_size)
    splits = {name: load_domain(name, roots.get(name), max_bytes_per_domain, val_fraction)
              for name in domains}

    _clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUILD_MARKER).write_text("a kinetic corpus: index.json is written when the build ends\n")
    if tok_file.resolve() != (out_dir / TOKENIZER_FILE).resolve():  # rebuilding with the corpus's own copy
        shutil.copyfile(tok_file, out_dir / TOKENIZER_FILE)
    index = {"format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size, "eos_id": EOS_ID,
             "tokenizer": TOKENIZER_FILE, "tokenizer_sha256": _tokenizer_sha256(tok_file),
             "max_bytes_per_domain": max_bytes_per_domain, "val_fraction": val_fraction, "domains": {}}
    total_bytes = sum(len(d.encode("utf-8")) for parts in splits.values() for docs in parts for d in docs)
    if workers is None:
        workers = (os.cpu_count() or 1) if total_bytes >= POOL_MIN_BYTES else 1
    encode_chunks, close = _make_encoder(tok_file, workers)
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                  disable=None if progress is None else not progress) as bar:
            for name, (train, val) in splits.items():
                (out_dir / name).mkdir()
                source = get_source(name)
                entry = {"license": source.license, "description": source.description}
                for split, docs in (("train", train), ("val", val)):
                    entry[split] = _write_split(out_dir, name, split, docs, dtype, shard_tokens,
                                                encode_chunks, bar)
                index["domains"][name] = entry
    finally:
        close()
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _write_split(out_dir: Path, domain: str, split: str, docs: list[str], dtype: np.dtype,
                 shard_tokens: int, encode_chunks, bar: tqdm) -> dict:
    writer = _ShardWriter(out_dir, domain, split, dtype, shard_tokens)
    chunks = list(_chunks(docs))
    try:
        for chunk, (ids, lengths) in zip(chunks, encode_chunks(chunks), strict=True):
            writer.write(ids, lengths)
            bar.update(sum(len(d.encode("utf-8")) for d in chunk))
    finally:
        writer.close()
    return {"bytes": sum(len(d.encode("utf-8")) for d in docs), "documents": len(docs),
            "tokens": sum(s["tokens"] for s in writer.shards), "shards": writer.shards}
