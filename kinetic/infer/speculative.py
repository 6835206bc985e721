"""MTP speculative decoding: the model's MTP layer drafts tokens, one main-model pass verifies them.

One round, with T tokens already in the main model's cache and the next token x_T known:

1. Draft k tokens with the MTP layer. Its position i takes ``(h_i, embed(x_{i+1}))`` -- the main
   model's final-normed hidden state and the token after it -- and predicts x_{i+2}. Its own
   InferenceCache holds the committed positions (its attention needs them), so the first draft is the
   output at position T-1 and costs nothing extra (it came with the previous round's commit). Further
   drafts apply the same (first) MTP depth recursively at positions T, T+1, ..., feeding its own block
   output back as the hidden state, as Nemotron 3 Super does with its single shared MTP block; these
   positions are speculative and the MTP cache is restored to its bookmark afterwards. (Checkpoints
   with several chained depths are drafted with the first depth only.)
2. Verify: one forward of the main model over ``[x_T, d_1 .. d_k]`` under ``cache.tracking()``, giving
   the target distribution at k+1 positions.
3. Accept. Greedy: the longest prefix of drafts equal to the target's argmax, then the target's own
   token at the first mismatch (or after the last draft) -- so the output is token for token the
   plain greedy output. Sampling: the speculative-sampling rule (Leviathan et al. 2023, Chen et al.
   2023): accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection sample
   from normalize(max(p_j - q_j, 0)) and stop; if all are accepted sample a bonus token from
   p_{k+1}. Every emitted token is then distributed exactly as plain sampling from p (the target's
   distribution after temperature/top-k/top-p).
4. Roll back: ``cache.keep(1 + n_accepted)`` leaves the main cache as if only the accepted tokens had
   been fed (Mamba conv/SSM states from the tracked per-position states, KV lengths cut); the MTP
   cache is restored to its bookmark and then commits the accepted positions, whose output drafts the
   next round.

:mod:`kinetic.infer.static_speculative` runs the same rounds on fixed shapes for ``torch.compile``
(``kinetic.infer.generate.speculative_generate(compile=True)``, ``Engine(compile_decode=True)`` on CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kinetic.infer.cache import InferenceCache
from kinetic.infer.sampling import top_k_filter, top_p_filter


@dataclass
class SpecStats:
    rounds: int = 0  # verification passes of the main model
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens produced by the rounds (accepted drafts + one target token each)
    # host wall-clock seconds per phase of the step-by-step rounds (SpeculativeDecoder.round; fused
    # fixed-shape rounds leave them 0). On CUDA, queued GPU work is counted in the phase that waits
    # for it (verification reads the logits back), so these split the time meaningfully on CPU only.
    draft_s: float = 0.0  # MTP drafting
    verify_s: float = 0.0  # main-model pass over [last token, drafts], acceptance, cache rollback
    commit_s: float = 0.0  # MTP pass over the accepted positions

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per main-model pass (accepted drafts + the target's token); 1.0 = no gain."""
        return self.emitted / self.rounds if self.rounds else 0.0

    def add(self, other: SpecStats) -> None:
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.draft_s += other.draft_s
        self.verify_s += other.verify_s
        self.commit_s += other.commit_s

    def as_dict(self) -> dict:
        """The counts and the rates derived from them (not the phase times)."""
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "emitted": self.emitted, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length}


def accept_drafts(drafts: list[int], p: torch.Tensor | None, q: torch.Tensor | None,
                  target_logits: torch.Tensor, generator: torch.Generator | None,
                  ) -> tuple[int, int]:
    """How many drafts to keep and the token that follows them.

    ``target_logits`` (k+1, vocab) are the main model's logits at the verified positions. Greedy when
    ``p`` is None; else ``p`` (k+1, vocab) and ``q`` (k, vocab) are the target's and the drafter's
    sampling distributions and the speculative-sampling rule applies.
    """
    k = len(drafts)
    if p is None:
        target = target_logits.argmax(-1).tolist()
        n = 0
        while n < k and drafts[n] == target[n]:
            n += 1
        return n, target[n]
    device = p.device
    for j, d in enumerate(drafts):
        ratio = p[j, d] / q[j, d]
        u = torch.rand((), generator=generator, device=device)
        if u >= ratio:  # reject: resample from the part of p that q under-proposed
            residual = (p[j] - q[j]).clamp_(min=0)
            if float(residual.sum()) <= 0:  # p == q up to rounding: nothing to correct
                residual = p[j]
            return j, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


class MTPDrafter:
    """The MTP layer's side of speculative decoding: its cache of committed positions and drafts."""

    def __init__(self, model: torch.nn.Module) -> None:
        if getattr(model, "mtp", None) is None:
            raise ValueError("speculative decoding needs a checkpoint with MTP layers "
                             "(config num_nextn_predict_layers >= 1)")
        self.model = model
        self.cache = InferenceCache()
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (block out, normed) at the end

    def commit(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Feed committed positions: main final-normed ``hidden`` (1, n, d) and, for each, the token
        that follows it (1, n)."""
        m = self.model
        x, normed = m.mtp.forward_depth(0, hidden, m.backbone.embeddings(next_tokens), self.cache)
        self._last = (x[:, -1:], normed[:, -1:])

    def draft(self, k: int, pick: Callable[[torch.Tensor], tuple[int, torch.Tensor | None]]
              ) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens after the last committed position; ``pick(logits)`` -> (token, its
        sampling distribution or None). Returns the tokens and the stacked distributions."""
        m = self.model
        x, normed = self._last
        snap = self.cache.snapshot()
        tokens, dists = [], []
        for j in range(k):
            token, dist = pick(m.lm_head(normed[0, -1]).float())
            tokens.append(token)
            dists.append(dist)
            if j + 1 < k:
                embed = m.backbone.embeddings(torch.tensor([[token]], device=x.device))
                x, normed = m.mtp.forward_depth(0, x, embed, self.cache)
        self.cache.restore(snap)
        q = torch.stack(dists) if dists and dists[0] is not None else None
        return tokens, q


class SpeculativeDecoder:
    """Drafts with MTP and verifies with the main model, for one sequence (batch 1).

    ``distribution(logits)`` maps logits (..., vocab) to sampling probabilities (None = greedy).
    :func:`prefill` fills the main cache, commits the prompt's MTP positions and picks the first
    token; then :meth:`round` runs per step."""

    def __init__(self, model: torch.nn.Module, cache: InferenceCache,
                 distribution: Callable[[torch.Tensor], torch.Tensor] | None,
                 generator: torch.Generator | None = None, totals: SpecStats | None = None) -> None:
        self.model = model
        self.cache = cache
        self.drafter = MTPDrafter(model)
        self.distribution = distribution
        self.generator = generator
        self.stats = SpecStats()  # this sequence's rounds
        self.totals = totals  # also counted here (e.g. an engine's running totals)
        self.last_token: int | None = None  # known next token, not yet in the main cache

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if self.distribution is None:
            return int(logits.argmax()), None
        dist = self.distribution(logits)
        return int(torch.multinomial(dist, 1, generator=self.generator)), dist

    def commit_prompt(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """MTP positions of a prefill chunk: hidden (1, n, d) and the tokens after each (1, n)."""
        self.drafter.commit(hidden, next_tokens)

    def round(self, max_drafts: int) -> list[int]:
        """One draft + verify round; returns the new tokens (1 .. max_drafts + 1). The last of
        them becomes ``last_token`` (not yet in the cache)."""
        m, dev = self.model, self.cache_device()
        t0 = time.perf_counter()
        drafts, q = self.drafter.draft(max_drafts, self.pick) if max_drafts > 0 else ([], None)
        t1 = time.perf_counter()
        ids = torch.tensor([[self.last_token, *drafts]], device=dev)
        with self.cache.tracking():
            out = m(ids, self.cache, return_mtp=False)
        logits = out.logits[0]
        p = None if self.distribution is None else self.distribution(logits)
        n, nxt = accept_drafts(drafts, p, q, logits, self.generator)
        self.cache.keep(1 + n)
        new = drafts[:n] + [nxt]
        t2 = time.perf_counter()
        self.drafter.commit(out.hidden_states[:, :1 + n], torch.tensor([new], device=dev))
        self.last_token = nxt
        this = SpecStats(rounds=1, drafted=len(drafts), accepted=n, emitted=n + 1, draft_s=t1 - t0,
                         verify_s=t2 - t1, commit_s=time.perf_counter() - t2)
        self.stats.add(this)
        if self.totals is not None:
            self.totals.add(this)
        return new

    def cache_device(self) -> torch.device:
        return next(self.model.parameters()).device


def target_distribution(temperature: float, top_k: int = 0, top_p: float = 1.0
                        ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The sampling distribution plain decoding uses (None for greedy), for rows of logits."""
    if temperature == 0:
        return None
    def dist(logits: torch.Tensor) -> torch.Tensor:
        scaled = logits.float() / temperature
        return top_p_filter(top_k_filter(scaled, top_k), top_p).softmax(dim=-1)

    return dist


def prefill(model: torch.nn.Module, cache: InferenceCache, prompt: list[int], chunk: int,
            dec: SpeculativeDecoder | None = None, pick: Callable | None = None) -> int:
    """Feed ``prompt`` through the main model in chunks of ``chunk`` tokens (0 = all at once) and
    return the first new token (picked by ``dec`` when given, else by ``pick(logits)``). With ``dec``
    the MTP layer commits every prompt position too."""
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt], device=dev)
    n = len(prompt)
    chunk = chunk or n
    pending = None  # MTP needs the token after each position: the last chunk's final position waits
    for start in range(0, n, chunk):
        part = ids[:, start:start + chunk]
        out = model(part, cache, return_mtp=False, logits_to_keep=1)
        if dec is not None:
            if pending is not None:
                dec.commit_prompt(pending, part[:, :1])
            if part.shape[1] > 1:
                dec.commit_prompt(out.hidden_states[:, :-1], part[:, 1:])
            pending = out.hidden_states[:, -1:]
    logits = out.logits[0, -1]
    if dec is not None:
        token, _ = dec.pick(logits)
        dec.commit_prompt(pending, torch.tensor([[token]], device=dev))
        dec.last_token = token
        return token
    return pick(logits)
