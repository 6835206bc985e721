"""Supervised fine-tuning on chats, on the one trainer (:class:`kinetic.train.trainer.Trainer`).

* **Examples.** :func:`chat_examples` turns conversations (OpenAI ``messages``, e.g. read from JSONL by
  :func:`read_chats`) into (ids, loss mask) pairs through :mod:`kinetic.data.chat`: a chat with
  reasoning in k assistant turns gives k examples, and only assistant output counts (reasoning and
  the end-of-turn token included; system, user and tool tokens never).
* **Reasoning control** (as NVIDIA trains Nemotron 3): a fraction ``strip_reasoning`` of the examples
  (about 10%) lose their reasoning (an empty ``<think></think>``), and a fraction ``cut_reasoning``
  (a few percent) are cut at a random budget with a forced ``</think>`` that the loss does not count.
* **Packing.** :class:`SFTSource` packs whole examples into rows of ``seq_len + 1`` tokens (never
  truncating one; an example longer than a row is an error naming it), shuffled per epoch from a
  seed, and yields :class:`SFTBatch` micro-batches; its state is (epoch, position), so a resumed run
  continues exactly.
* **Loss** (:func:`sft_loss`): cross-entropy over the counted tokens, averaged per token (the fused
  LM-head loss) or per conversation (each conversation's mean, then the mean over conversations).
* :func:`grow_vocabulary` gives an existing checkpoint embedding rows for tokens its tokenizer
  gained (the chat tokens).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kinetic.data.chat import encode_chat, training_chats
from kinetic.ops.loss import IGNORE_INDEX


def read_chats(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file with one ``{"messages": [...]}`` object per line."""
    chats = []
    path = Path(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{n} is not valid JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ValueError(f"{path}:{n} must be an object with a 'messages' list (OpenAI's chat format)")
        chats.append(record["messages"])
    return chats


@dataclass(frozen=True)
class Example:
    ids: list[int]
    mask: list[int]  # 1 where the token counts in the loss
    conversation: int  # index of the chat it came from


def chat_examples(tok: Tokenizer, chats: Iterable[Sequence[dict]], *, strip_reasoning: float = 0.0,
                  cut_reasoning: float = 0.0, seed: int = 0) -> list[Example]:
    """The training examples of ``chats`` with the reasoning-control augmentation (see the module
    docstring); the draws depend on ``seed`` only."""
    rng = random.Random(seed)
    end = tok.token_to_id("</think>")
    out = []
    for c, chat in enumerate(chats):
        for messages, start in training_chats(chat):
            roll = rng.random()
            last = messages[-1]
            reasoning = last.get("role") == "assistant" and last.get("reasoning_content")
            if reasoning and roll < strip_reasoning:
                messages = [*messages[:-1], {**last, "reasoning_content": None}]
            ids, mask = encode_chat(tok, messages, train_from=start)
            if reasoning and strip_reasoning <= roll < strip_reasoning + cut_reasoning:
                ids, mask = _cut_reasoning(ids, mask, end, tok.token_to_id("<think>"), rng)
            out.append(Example(ids, mask, c))
    return out


def _cut_reasoning(ids: list[int], mask: list[int], end: int, start: int, rng: random.Random):
    """Keep a random number of the last trained turn's reasoning tokens, then a forced ``</think>``
    that does not count, then the answer."""
    close = len(ids) - 1 - ids[::-1].index(end)
    open_ = close - 1 - ids[close - 1::-1].index(start)
    length = close - open_ - 1
    if length < 2:
        return ids, mask
    keep = rng.randrange(1, length)
    cut = open_ + 1 + keep
    ids = ids[:cut] + ids[close:]
    mask = mask[:cut] + [0] + mask[close + 1:]
    return ids, mask


@dataclass
class SFTBatch:
    """Packed rows: tokens (b, L+1), labels (b, L+1) with IGNORE_INDEX where a token does not count,
    and conversation (b, L+1), the index of the example each token belongs to (-1 for padding)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    conversation: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> SFTBatch:
        return SFTBatch(*(t.to(device, non_blocking=non_blocking)
                          for t in (self.tokens, self.labels, self.conversation)))


class SFTSource:
    """Packs examples into ``micro_batch`` rows of ``seq_len + 1`` tokens (see the module docstring);
    rank r of world w takes every w-th row."""

    def __init__(self, examples: Sequence[Example], seq_len: int, micro_batch: int, seed: int = 0,
                 pad_id: int = 0, rank: int = 0, world_size: int = 1) -> None:
        too_long = [i for i, e in enumerate(examples) if len(e.ids) > seq_len + 1]
        if too_long:
            i = too_long[0]
            raise ValueError(f"{len(too_long)} examples are longer than a row of seq_len + 1 = {seq_len + 1} "
                             f"tokens (example {i} has {len(examples[i].ids)}); raise data.seq_len or "
                             "shorten them (examples are never truncated)")
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.seq_len, self.micro_batch = list(examples), seq_len, micro_batch
        self.seed, self.pad_id, self.rank, self.world_size = seed, pad_id, rank, world_size
        self.epoch, self.position = 0, 0  # rows handed out in this epoch (all ranks)
        self._rows = self._pack(0)

    def _pack(self, epoch: int) -> list[list[int]]:
        """The epoch's rows, each a list of example indices (first fit in a shuffled order)."""
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        rows, row, used = [], [], 0
        for i in order:
            n = len(self.examples[i].ids)
            if used + n > self.seq_len + 1:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += n
        rows.append(row)
        return rows

    def next_batch(self) -> SFTBatch:
        width = self.seq_len + 1
        take = self.micro_batch * self.world_size
        chosen = []
        while len(chosen) < take:
            if self.position >= len(self._rows):
                self.epoch, self.position = self.epoch + 1, 0
                self._rows = self._pack(self.epoch)
            chosen.append(self._rows[self.position])
            self.position += 1
        mine = chosen[self.rank::self.world_size]
        tokens = torch.full((len(mine), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        owner = torch.full_like(tokens, -1)
        for r, row in enumerate(mine):
            at = 0
            for i in row:
                e = self.examples[i]
                span = slice(at, at + len(e.ids))
                tokens[r, span] = torch.tensor(e.ids)
                labels[r, span] = torch.tensor([t if m else IGNORE_INDEX
                                                for t, m in zip(e.ids, e.mask, strict=True)])
                owner[r, span] = i
                at += len(e.ids)
        return SFTBatch(tokens, labels, owner)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._rows = self._pack(self.epoch)


def sft_loss(per_conversation: bool = False):
    """The trainer's loss for :class:`SFTBatch`: mean cross-entropy over the counted tokens, or, with
    ``per_conversation``, the mean over conversations of each one's mean (long answers then weigh no
    more than short ones)."""

    def loss_fn(model: torch.nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = batch.tokens[:, :-1], batch.labels
        if not per_conversation:
            loss = model(inputs, labels=labels, return_mtp=False).loss
            return loss, {"lm_loss": float(loss.detach())}
        logits = model(inputs, return_mtp=False).logits.float()  # (b, L, vocab)
        targets = labels[:, 1:]
        counted = targets != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0),
                                                reduction="none")
        owner = batch.conversation[:, 1:]
        ids = owner[counted].unique()
        per = torch.stack([nll[counted & (owner == i)].mean() for i in ids]) if len(ids) else nll.sum() * 0
        loss = per.mean()
        return loss, {"lm_loss": float(loss.detach())}

    return loss_fn


@torch.no_grad()
def grow_vocabulary(model: torch.nn.Module, size: int) -> int:
    """Give ``model`` embedding (and LM-head) rows up to ``size`` tokens, the new ones set to the mean
    of the existing rows, and set its config's vocab_size; the old tokens' logits do not change.
    Returns the number of rows added."""
    old = model.config.vocab_size
    if size <= old:
        return 0
    emb = model.backbone.embeddings
    grown = torch.cat([emb.weight, emb.weight.mean(0, keepdim=True).expand(size - old, -1)])
    emb.weight = torch.nn.Parameter(grown)
    emb.num_embeddings = size
    if model.config.tie_word_embeddings:
        model.lm_head.weight = emb.weight
    else:
        head = model.lm_head.weight
        rows = head.mean(0, keepdim=True).expand(size - old, -1)
        model.lm_head.weight = torch.nn.Parameter(torch.cat([head, rows]))
    model.lm_head.out_features = size
    model.config = model.config.replace(vocab_size=size)
    return size - old


def with_chat_tokens(model: torch.nn.Module, tok: Tokenizer) -> Tokenizer:
    """``tok`` with the chat tokens (:func:`kinetic.data.chat.add_chat_tokens`) and ``model`` with
    rows for every id the tokenizer now has."""
    from kinetic.data.chat import add_chat_tokens

    add_chat_tokens(tok)
    grow_vocabulary(model, tok.get_vocab_size())
    return tok


