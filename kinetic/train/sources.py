"""Batch sources the trainer can draw from. A source yields (batch, seq_len + 1) token windows and
can save/restore its position; kinetic.data.loader.BlendedLoader is the real-corpus one."""

from __future__ import annotations

from typing import Protocol

import torch


class BatchSource(Protocol):
    def next_batch(self) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class SyntheticSource:
    """Deterministic synthetic text for tests and benchmarks: a fixed random Markov chain in which
    every token has ``branching`` possible successors, so a model can learn it quickly and the best
    achievable loss is ln(branching). The global batch of step i is a function of (seed, i); rank r
    of world w takes its slice, so any world size sees the same global stream."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, branching: int = 4) -> None:
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        table_gen = torch.Generator().manual_seed(1234)  # the "language" is the same for every seed
        self.successors = torch.randint(3, vocab_size, (vocab_size, branching), generator=table_gen)
        self.index = 0

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        rows = self.batch_size * self.world_size
        choices = torch.randint(0, self.successors.shape[1], (rows, self.seq_len), generator=g)
        tokens = [torch.randint(3, self.vocab_size, (rows,), generator=g)]
        for t in range(self.seq_len):
            tokens.append(self.successors[tokens[-1], choices[:, t]])
        self.index += 1
        batch = torch.stack(tokens, dim=1)
        return batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])
