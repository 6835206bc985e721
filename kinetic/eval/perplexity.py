"""Validation loss and bits per byte per domain of a packed corpus, next to a unigram baseline.

Bits per byte (bpb) = total next-token negative log-likelihood in bits / UTF-8 bytes of the text
scored, so models with different tokenizers compare. The domain's val split is cut into
consecutive windows of ``seq_len + 1`` tokens (each token after the first of a window is scored
once, given at most ``seq_len`` tokens of context); when ``max_tokens`` truncates a split, the
bytes are prorated by the share of its tokens scored. The baseline is a unigram model estimated on
the same domain's train split with add-one smoothing and scored on the same tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kinetic.data.loader import read_index


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose latest training checkpoint is used."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    from kinetic.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no config.json) nor a run directory "
                                "with checkpoints/latest")
    return latest


def _split_tokens(corpus: Path, index: dict, domain: str, split: str) -> np.ndarray:
    dtype = np.dtype(index["dtype"])
    parts = [np.fromfile(corpus / s["file"], dtype=dtype) for s in index["domains"][domain][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def unigram_nll(train: np.ndarray, scored: np.ndarray, vocab_size: int) -> float:
    """Total NLL in nats of ``scored`` under add-one-smoothed unigram counts of ``train``."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[scored.astype(np.int64)].sum())


@torch.no_grad()
def model_nll(model, tokens: np.ndarray, seq_len: int, batch_size: int) -> tuple[float, int]:
    """Total NLL in nats and number of scored tokens over consecutive windows of ``tokens`` (scored on
    the model's device)."""
    n_windows = max((len(tokens) - 1) // seq_len, 0)
    total, scored = 0.0, 0
    windows = [tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(n_windows)]
    device = next(model.parameters()).device
    for start in range(0, n_windows, batch_size):
        batch = torch.from_numpy(np.stack(windows[start:start + batch_size]).astype(np.int64)).to(device)
        out = model(batch[:, :-1], labels=batch, return_mtp=False)
        count = batch[:, 1:].numel()
        total += out.loss.item() * count
        scored += count
    return total, scored


def evaluate_corpus(model, corpus_dir: str | Path, seq_len: int = 256, batch_size: int = 8,
                    max_tokens: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Per-domain and overall validation loss (nats/token), model bpb and unigram-baseline bpb."""
    corpus = Path(corpus_dir)
    index = read_index(corpus)
    if index["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"corpus vocabulary {index['vocab_size']} is larger than the model's "
                         f"vocab_size={model.config.vocab_size}: was it built with another tokenizer?")
    was = model.training
    model.eval()
    results: dict[str, Any] = {"domains": {}}
    totals = {"nll": 0.0, "unigram": 0.0, "tokens": 0, "bytes": 0.0}
    domains = list(index["domains"])
    iterator = domains
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(domains, desc="eval", unit="domain")
    for name in iterator:
        val = _split_tokens(corpus, index, name, "val")
        if max_tokens is not None:
            val = val[: max_tokens + 1]
        nll, scored = model_nll(model, val, seq_len, batch_size)
        if scored == 0:
            continue
        n_windows = scored // seq_len if seq_len else 0
        targets = np.concatenate([val[i * seq_len + 1: i * seq_len + seq_len + 1] for i in range(n_windows)])
        uni = unigram_nll(_split_tokens(corpus, index, name, "train"), targets, index["vocab_size"])
        split = index["domains"][name]["val"]
        nbytes = split["bytes"] * scored / max(split["tokens"], 1)
        results["domains"][name] = {
            "tokens": scored, "bytes": nbytes, "loss": nll / scored,
            "bpb": nll / math.log(2) / nbytes, "unigram_bpb": uni / math.log(2) / nbytes,
        }
        for key, value in (("nll", nll), ("unigram", uni), ("tokens", scored), ("bytes", nbytes)):
            totals[key] += value
    model.train(was)
    if totals["tokens"]:
        results["overall"] = {
            "tokens": totals["tokens"], "bytes": totals["bytes"], "loss": totals["nll"] / totals["tokens"],
            "bpb": totals["nll"] / math.log(2) / totals["bytes"],
            "unigram_bpb": totals["unigram"] / math.log(2) / totals["bytes"],
        }
    return results
