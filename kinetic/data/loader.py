"""Blended, deterministic, resumable loader over a packed corpus (see :mod:`kinetic.data.pack`).

One global stream of samples is defined by (corpus, split, weights, seq_len, seed) alone:

* sample ``i`` goes to the domain whose share is furthest behind its weight, i.e. the ``d`` that
  maximizes ``w_d * (i + 1) - served_d`` (ties: first domain), so every prefix of the stream holds
  the domains in their weights' proportions, without randomness in the mix;
* a domain's token stream (its shards) is cut into windows of ``seq_len + 1`` tokens starting every
  ``seq_len`` tokens (neighbours share one token, so every token is a target once per epoch); the
  ``k``-th sample of a domain is window ``perm[k % n]`` of epoch ``k // n``, where ``perm`` is a
  permutation seeded by (seed, domain name, epoch).

Ranks split the stream: step ``t`` covers samples ``[t*B*W, (t+1)*B*W)`` and rank ``r`` takes the
``r``-th block of ``B`` of them, so ranks never share a sample and the union of their batches is the
batch a single process with batch size ``B*W`` would see. The state is the next sample index and the
per-domain counts (plus this rank's tokens served), so a restored loader continues exactly, also with
another world size.

Batches are ``(batch_size, seq_len + 1)`` int64 tensors: inputs ``x[:, :-1]``, targets ``x[:, 1:]``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from kinetic.data.pack import FORMAT_VERSION, INDEX_FILE

SPLITS = ("train", "val")


def read_index(corpus_dir: str | Path) -> dict:
    """The corpus's index.json (FileNotFoundError with the fix when it is not a built corpus)."""
    path = Path(corpus_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{corpus_dir} is not a packed corpus (no {INDEX_FILE}); build one with "
                                "`kinetic data build --out DIR --tokenizer TOKENIZER_DIR`")
    try:
        index = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({err}); rebuild the corpus") from None
    found = index.get("format") if isinstance(index, dict) else None
    if found != FORMAT_VERSION:
        raise ValueError(f"{path}: format {found!r}, this kinetic reads {FORMAT_VERSION}; rebuild the corpus")
    return index


class _DomainWindows:
    """The ``seq_len + 1`` token windows of one domain's split, over its memory-mapped shards."""

    def __init__(self, corpus_dir: Path, name: str, split: dict, dtype: np.dtype, seq_len: int, seed: int):
        self.name, self.seq_len = name, seq_len
        self.shards: list[np.memmap] = []
        for shard in split["shards"]:
            path = corpus_dir / shard["file"]
            if path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, the index says {shard['tokens']} "
                                 f"{dtype.name} tokens; the corpus is damaged, rebuild it")
            if shard["tokens"] > seq_len:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        counts = [(len(s) - 1) // seq_len for s in self.shards]
        self.first = np.cumsum([0] + counts)  # first window id of each shard
        self.n = int(self.first[-1])
        self._key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")
        self._seed, self._perm_epoch, self._perm = seed, -1, None

    def window(self, k: int) -> np.ndarray:
        """The window of this domain's ``k``-th sample (epoch ``k // n``, shuffled within an epoch)."""
        epoch, pos = divmod(k, self.n)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self._seed, self._key, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        w = int(self._perm[pos])
        shard = int(np.searchsorted(self.first, w, side="right")) - 1
        start = (w - int(self.first[shard])) * self.seq_len
        return self.shards[shard][start: start + self.seq_len + 1]


class BlendedLoader:
    """Endless batches from a packed corpus, blended by domain ``weights`` (default: proportional to
    each domain's tokens). Iterate it, or call :meth:`next_batch`."""

    def __init__(self, corpus_dir: str | Path, split: str = "train",
                 weights: Mapping[str, float] | None = None, seq_len: int = 256, batch_size: int = 8,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        _check_args(split, seq_len, batch_size, rank, world_size)
        corpus_dir = Path(corpus_dir)
        index = read_index(corpus_dir)
        weights = _normalized_weights(index, split, weights)
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.domains = list(weights)
        self.weights = np.array([weights[d] for d in self.domains])
        dtype = np.dtype(index["dtype"])
        self._windows = [_DomainWindows(corpus_dir, d, index["domains"][d][split], dtype, seq_len, seed)
                         for d in self.domains]
        for w in self._windows:
            if w.n == 0:
                raise ValueError(f"domain {w.name!r} has too few {split} tokens for one window of seq_len+1="
                                 f"{seq_len + 1}; lower seq_len, give it weight 0, or build a larger corpus")
        self._fingerprint = {"tokenizer_sha256": index["tokenizer_sha256"], "split": split,
                             "seq_len": seq_len, "seed": seed, "weights": weights,
                             "tokens": {d: index["domains"][d][split]["tokens"] for d in self.domains}}
        self._sample = 0  # global index of the first sample of the next step
        self._counts = np.zeros(len(self.domains), dtype=np.int64)  # samples per domain in the global stream
        self._served = np.zeros(len(self.domains), dtype=np.int64)  # tokens this rank served

    # ------------------------------------------------------------------ batches
    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def next_batch(self) -> torch.Tensor:
        """This rank's next ``(batch_size, seq_len + 1)`` int64 batch."""
        step = self.batch_size * self.world_size
        rows = []
        for i in range(self._sample, self._sample + step):
            d = int(np.argmax(self.weights * (i + 1) - self._counts))
            k = int(self._counts[d])
            self._counts[d] += 1
            if (i - self._sample) // self.batch_size == self.rank:
                rows.append(self._windows[d].window(k))
                self._served[d] += self.seq_len
        self._sample += step
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def tokens_served(self) -> dict[str, int]:
        """Tokens (``seq_len`` targets per row) of each domain this rank has served."""
        return {d: int(n) for d, n in zip(self.domains, self._served, strict=True)}

    def global_tokens_served(self) -> dict[str, int]:
        """Tokens of each domain served to all ranks together (the same on every rank)."""
        return {d: int(n) * self.seq_len for d, n in zip(self.domains, self._counts, strict=True)}

    def epochs(self) -> dict[str, float]:
        """How many passes over each domain's windows the global stream has made."""
        return {w.name: int(n) / w.n for w, n in zip(self._windows, self._counts, strict=True)}

    # ------------------------------------------------------------------ resume
    def reset(self) -> None:
        """Back to the start of the stream (e.g. so every validation pass sees the same batches)."""
        self._sample = 0
        self._counts[:] = 0
        self._served[:] = 0

    def state_dict(self) -> dict:
        """Position in the stream; JSON-serializable. The same on every rank except ``tokens_served``."""
        return {"sample": self._sample, "counts": dict(zip(self.domains, self._counts.tolist(), strict=True)),
                "tokens_served": self.tokens_served(), "fingerprint": self._fingerprint}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state`` (ValueError if it came from another corpus, split, seq_len, seed or
        blend; batch size and world size may differ)."""
        theirs = state["fingerprint"]
        diff = [k for k in self._fingerprint if json.dumps(theirs.get(k)) != json.dumps(self._fingerprint[k])]
        if diff:
            raise ValueError(f"loader state does not match this loader in {', '.join(diff)}: "
                             f"state {[theirs.get(k) for k in diff]} vs loader "
                             f"{[self._fingerprint[k] for k in diff]}")
        self._sample = int(state["sample"])
        self._counts = np.array([state["counts"][d] for d in self.domains], dtype=np.int64)
        self._served = np.array([state["tokens_served"][d] for d in self.domains], dtype=np.int64)


def _check_args(split: str, seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")


def _normalized_weights(index: dict, split: str, weights: Mapping[str, float] | None) -> dict[str, float]:
    """Domain -> weight summing to 1, zero weights dropped, in the corpus's domain order."""
    known = index["domains"]
    if weights is None:
        weights = {d: known[d][split]["tokens"] for d in known}
    unknown = [d for d in weights if d not in known]
    if unknown:
        raise ValueError(f"unknown domain(s) {', '.join(map(repr, unknown))} in weights; this corpus has: "
                         f"{', '.join(known)}")
    bad = {d: w for d, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad or not any(weights.values()):
        raise ValueError(f"weights must be finite, >= 0 and not all 0; got {dict(weights)}")
    total = float(sum(weights.values()))
    return {d: weights[d] / total for d in known if weights.get(d, 0) > 0}
