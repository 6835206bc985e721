"""The decoder: one loop that advances a batch of sequences at different positions, one forward per
step, with continuous batching. Everything that generates tokens -- ``model.generate``, the
:class:`~kinetic.infer.engine.Engine`, ``kinetic generate`` / ``chat`` / ``serve``, RL rollouts --
runs it.

State: a :class:`~kinetic.infer.slots.SlotCache` for the main model (and one for the MTP layers when
decoding speculatively). Running sequences hold slots 0 .. R-1; a finished or cancelled sequence
frees its slot and the last running sequence moves into it.

A step (:meth:`Decoder.step`):

1. **Admission and prefill.** While slots are free, the first waiting group (sequences that share a
   prompt: the n samples of one request, the G rollouts of one RL prompt) is prefilled in slot R, one
   chunk of ``prefill_chunk`` tokens per step, so a long prompt does not stall the running ones. When
   its prompt is done, its state is copied into one slot per member, each samples its first token
   from the prompt's last logits with its own seed, and the group joins the running batch.
2. **Decode**, by one of two policies over all running sequences at once:

   * plain: a forward of each sequence's last token (batch R x 1), then one token per sequence;
   * speculative (MTP): the MTP layer drafts k tokens per sequence (k small forwards of R x 1), one
     tracked forward of the main model verifies them (R x (k+1)), each sequence accepts its own
     prefix, the caches keep each row's accepted positions, and the MTP layer commits them.

   One acceptance rule serves greedy and sampled decoding. A sequence's i-th token is
   ``argmax(processed log-probs + noise(seed, i))`` (the Gumbel-max trick; no noise when greedy), a
   function of the logits and of (seed, i) alone. Verification computes that token at each of the
   k+1 positions and keeps the drafts up to the first that differs, followed by the target's own
   token there. Every emitted token is therefore the token plain decoding would have drawn: the output
   equals plain decoding's token for token, greedy or sampled with a seed, and so has its
   distribution exactly. (Drafts are drawn with the same noise, which couples them to the target's
   draws; the speculative-sampling rule of Leviathan et al. 2023 would also keep the distribution,
   but not the draws.) By default the speculative policy runs while at most one sequence does: with
   more, verifying k+1 tokens per row costs more than the accepted drafts save on the quickstart
   model, so a bigger batch takes plain steps, and each sequence's MTP layer catches up on those
   positions in one pass when drafting resumes.

Every emitted token carries its log-prob under the raw and under the processed distribution
(:mod:`kinetic.infer.sampling`), from the same logits that chose it; the teacher-forced scorer
(:mod:`kinetic.infer.scoring`) computes the same numbers from a plain forward.

How a forward runs is an execution wrapper (:mod:`kinetic.infer.execution`): eagerly, through
``torch.compile``, or as a replayed CUDA graph, for the same step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kinetic.infer.sampling import SamplingParams, sample, sequence_seed, token_logprobs, top_logprobs
from kinetic.infer.slots import SlotCache

MTP_BEHIND_MAX = 64  # plain-step positions a sequence's MTP layer may lag before it catches up


@dataclass
class SpecStats:
    rounds: int = 0  # verification passes of the main model (one per sequence per step)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens produced by the rounds (accepted drafts + one target token each)
    draft_s: float = 0.0  # host wall-clock seconds in MTP drafting (per batched step)
    verify_s: float = 0.0  # main-model verification, acceptance and cache rollback
    commit_s: float = 0.0  # MTP pass over the accepted positions

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per main-model pass (accepted drafts + the target's token); 1.0 = no gain."""
        return self.emitted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "emitted": self.emitted, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length}


@dataclass
class Token:
    """One emitted token and its log-probs."""

    id: int
    logprob: float  # under the raw distribution
    processed_logprob: float  # under the distribution it was sampled from (0.0 when greedy)
    top: list[tuple[int, float]] | None = None  # the most likely alternatives (raw), if asked


@dataclass
class Sequence:
    """One prompt's decoding state, as the decoder sees it."""

    prompt: list[int]
    params: SamplingParams
    seed: int = 0  # its draws' seed (kinetic.infer.sampling.gumbel_noise)
    slot: int | None = None
    tokens: list[Token] = field(default_factory=list)  # emitted so far
    prompt_logprobs: list[Token | None] | None = None  # with params.prompt_logprobs: None first
    stats: SpecStats = field(default_factory=SpecStats)
    last: int | None = None  # the last token, not yet fed to the model
    draft_state: tuple | None = None  # MTP (block output, normed) at the last committed position
    mtp_behind: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # plain steps' (h_p, x_p+1)
    forced: list[int] = field(default_factory=list)  # tokens to emit next instead of drawing them
    done: bool = False


@dataclass
class _Group:
    seqs: list[Sequence]
    fed: int = 0  # prompt tokens prefilled so far
    pending: torch.Tensor | None = None  # MTP: the last prefilled position's hidden state


def accepted(drafts: list[int], targets: list[int]) -> int:
    """How many drafts to keep: the length of their prefix equal to the target's tokens at those
    positions (the target's token after them comes next)."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


class Decoder:
    """Continuous batching over ``model`` (see the module docstring).

    ``max_batch`` bounds the running sequences; ``speculative`` drafts ``draft_tokens`` tokens per
    step with the MTP layer while at most ``speculative_max_batch`` sequences run (a bigger batch takes
    plain steps: verifying k+1 tokens per row then costs more than the accepted drafts save; the MTP
    layer catches up on those positions in one pass when drafting resumes); ``prefill_chunk`` bounds
    the prompt tokens of one forward; ``execution`` runs the forwards (:mod:`kinetic.infer.execution`;
    default eager)."""

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 16, speculative: bool = False,
                 draft_tokens: int = 2, prefill_chunk: int = 8192, execution=None,
                 speculative_max_batch: int | None = 1) -> None:
        if speculative and getattr(model, "mtp", None) is None:
            raise ValueError("speculative decoding needs a checkpoint with MTP layers (config "
                             "num_nextn_predict_layers >= 1); this one has none")
        if speculative_max_batch is not None and speculative_max_batch < 0:
            raise ValueError(f"speculative_max_batch={speculative_max_batch} must be >= 0 (0: never draft)")
        if max_batch < 1 or prefill_chunk < 1 or draft_tokens < 0:
            raise ValueError(f"max_batch={max_batch} and prefill_chunk={prefill_chunk} must be >= 1 and "
                             f"draft_tokens={draft_tokens} >= 0")
        from kinetic.infer.execution import Eager

        self.model = model
        self.max_batch = max_batch
        self.speculative = speculative and draft_tokens > 0
        self.draft_tokens = draft_tokens
        self.prefill_chunk = prefill_chunk
        self.speculative_max_batch = max_batch if speculative_max_batch is None else speculative_max_batch
        self.execution = execution or Eager()
        self.device = next(model.parameters()).device
        self.cache = SlotCache()
        self.mtp_cache = SlotCache() if self.speculative else None
        self.running: list[Sequence] = []  # running[i] holds slot i
        self.waiting: deque[_Group] = deque()
        self.stats = SpecStats()  # every speculative round so far

    # ---------------------------------------------------------------- requests
    def add(self, prompt: list[int], params: SamplingParams, n: int = 1,
            seeds: list[int] | None = None) -> list[Sequence]:
        """Queue ``n`` samples of ``prompt`` (prefilled once); returns their sequences. Sample j's
        draws are seeded with ``seeds[j]``, by default ``params.seed + j`` (fresh randomness when the
        params have no seed)."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if n < 1 or n > self.max_batch:
            raise ValueError(f"n={n} samples must be in [1, max_batch={self.max_batch}]")
        if seeds is None:
            seeds = [sequence_seed(None if params.seed is None else params.seed + j) for j in range(n)]
        seqs = [Sequence(list(prompt), params, seeds[j]) for j in range(n)]
        self.waiting.append(_Group(seqs))
        return seqs

    @torch.inference_mode()
    def cancel(self, seq: Sequence) -> None:
        """Stop decoding ``seq`` (finished or abandoned) and free its slot."""
        seq.done = True
        if seq.slot is not None and seq.slot < len(self.running) and self.running[seq.slot] is seq:
            self._free(seq.slot)
        for group in list(self.waiting):
            if seq in group.seqs:
                group.seqs.remove(seq)
                if not group.seqs:
                    self.waiting.remove(group)
                elif group.seqs[0].prompt_logprobs is None:  # the scored prompt so far moves along
                    group.seqs[0].prompt_logprobs = seq.prompt_logprobs

    def _free(self, slot: int) -> None:
        last = len(self.running) - 1
        moved = self.running.pop()
        if slot < last:  # the last running sequence takes the freed slot
            self.running[slot] = moved
            moved.slot = slot
            self._copy(last, slot)
        if self.waiting and self.waiting[0].fed:  # a prefill in progress sat after the running ones
            self._copy(last + 1, last)

    def _copy(self, src: int, dst: int) -> None:
        self.cache.copy(src, dst)
        if self.mtp_cache is not None:
            self.mtp_cache.copy(src, dst)

    def force(self, seq: Sequence, tokens: list[int]) -> None:
        """Make ``seq`` emit ``tokens`` next, in order, instead of drawing them (e.g. ``</think>`` when
        a reasoning budget runs out); each is reported with its log-probs under the model."""
        seq.forced.extend(tokens)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    # ---------------------------------------------------------------- the loop
    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, list[Token]]]:
        """One prefill chunk (if a group waits and fits) and one decode step of the running
        sequences. Returns each sequence's new tokens (a sequence's first token comes from its
        prefill). A sequence that reaches ``params.max_new_tokens`` ends here (tokens a speculative
        step made past it are dropped); other stops are the caller's (``cancel``)."""
        out: list[tuple[Sequence, list[Token]]] = []
        if self.waiting and len(self.running) + len(self.waiting[0].seqs) <= self.max_batch:
            out += self._prefill_chunk(self.waiting[0])
        count = len(self.running) - len(out)  # a group that just joined holds the last slots
        forcing = any(s.forced for s in self.running[:count])  # plain steps emit forced tokens
        if count and self.speculative and count <= self.speculative_max_batch and not forcing:
            out += self._speculative_step(count)
        elif count:
            out += self._plain_step(count)
        for i, (s, tokens) in enumerate(out):
            over = len(s.tokens) - s.params.max_new_tokens
            if over >= 0:
                if over:
                    del s.tokens[-over:]
                    out[i] = (s, tokens[:len(tokens) - over])
                self.cancel(s)
        return out

    def run(self) -> None:
        """Step until every sequence has ended (at ``max_new_tokens``, or by ``cancel``)."""
        while self.busy:
            self.step()

    # ---------------------------------------------------------------- prefill
    def _prefill_chunk(self, group: _Group) -> list[tuple[Sequence, list[Token]]]:
        slot, first = len(self.running), group.seqs[0]
        prompt, n = first.prompt, len(first.prompt)
        if group.fed == 0:
            for cache in (self.cache, self.mtp_cache):
                if cache is not None:
                    cache.ensure(slot + len(group.seqs), self._capacity(group))
                    cache.reset(slot)
            if any(s.params.prompt_logprobs is not None for s in group.seqs):
                first.prompt_logprobs = [None]  # the first prompt token has no context to be scored in
        rows = slice(slot, slot + 1)
        start = group.fed
        ids = torch.tensor([prompt[start:start + self.prefill_chunk]], device=self.device)
        echo = first.prompt_logprobs is not None
        self.cache.open(rows, ids.shape[1])
        out = self.execution.forward(self.model, ids, self.cache, logits_to_keep=0 if echo else 1)
        self.cache.close()
        group.fed += ids.shape[1]
        if echo:  # the chunk's positions predict the next prompt tokens (the last, past the prompt)
            targets = prompt[start + 1:start + 1 + ids.shape[1]]
            k = max(s.params.prompt_logprobs or 0 for s in group.seqs)
            first.prompt_logprobs += self._tokens(out.logits[0, :len(targets)], targets, None, k)
        if self.speculative:
            self._commit_prompt(group, rows, out.hidden_states, ids)
        if group.fed < n:
            return []
        # the prompt is done: one slot per sample, each draws its first token
        seqs = group.seqs
        self.waiting.popleft()
        for j, s in enumerate(seqs):
            s.slot = slot + j
            if j:
                self._copy(slot, slot + j)
                s.prompt_logprobs = first.prompt_logprobs
            self.running.append(s)
        logits = out.logits[:, -1].expand(len(seqs), -1)
        tokens = self._choose(logits, seqs)
        if self.speculative:
            rows = slice(slot, slot + len(seqs))
            pending = group.pending.expand(len(seqs), -1, -1)
            self._mtp_commit(rows, pending, torch.tensor([[t[0].id] for t in tokens], device=self.device),
                             [1] * len(seqs), seqs)
        for s, t in zip(seqs, tokens, strict=True):
            s.last = t[0].id
            s.tokens += t
        return list(zip(seqs, tokens, strict=True))

    def capacity(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """KV positions a sequence's slot is given: its prompt and new tokens, the positions a
        speculative verification writes past them, and the spare one of fixed-shape steps."""
        return prompt_tokens + max_new_tokens + (self.draft_tokens + 1 if self.speculative else 0) + 1

    def _capacity(self, group: _Group) -> int:
        return self.capacity(len(group.seqs[0].prompt), group.seqs[0].params.max_new_tokens)

    def _commit_prompt(self, group: _Group, rows: slice, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """MTP positions of a prefill chunk: position i takes (h_i, embed(token i+1)); a chunk's last
        position waits for the next chunk's first token (or the first sampled token)."""
        if group.pending is not None:
            self._mtp_forward(rows, group.pending, ids[:, :1])
        if ids.shape[1] > 1:
            self._mtp_forward(rows, hidden[:, :-1], ids[:, 1:])
        group.pending = hidden[:, -1:]

    def _mtp_forward(self, rows: slice, hidden: torch.Tensor, next_ids: torch.Tensor, tracking=False):
        m = self.model
        self.mtp_cache.open(rows, next_ids.shape[1], tracking=tracking)
        x, normed = self.execution.mtp(m, hidden, m.backbone.embeddings(next_ids), self.mtp_cache)
        if not tracking:
            self.mtp_cache.close()
        return x, normed

    def _mtp_commit(self, rows: slice, hidden: torch.Tensor, next_ids: torch.Tensor, keep: list[int],
                    seqs: list[Sequence]) -> None:
        """Feed committed positions to the MTP layer (tracked when some rows keep fewer than all)
        and remember each row's output at its last kept position: it drafts the next round."""
        tracked = any(k < next_ids.shape[1] for k in keep)
        x, normed = self._mtp_forward(rows, hidden, next_ids, tracking=tracked)
        if tracked:
            self.mtp_cache.keep(keep)
        for i, s in enumerate(seqs):
            at = keep[i] - 1
            s.draft_state = (x[i:i + 1, at:at + 1], normed[i:i + 1, at:at + 1])

    # ---------------------------------------------------------------- choosing tokens
    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[list[Token]]:
        """Each sequence's next token from its row of ``logits`` (a forced one where it has one)."""
        choice = sample(logits, [s.params for s in seqs], [(s.seed, len(s.tokens)) for s in seqs])
        out = []
        for i, s in enumerate(seqs):
            top = self._top(logits[i], s.params.logprobs)
            if s.forced:
                (token,) = self._tokens(logits[i:i + 1], [s.forced.pop(0)], s.params, s.params.logprobs)
                out.append([token])
                continue
            out.append([Token(int(choice.tokens[i]), float(choice.logprob[i]),
                              float(choice.processed_logprob[i]), top)])
        return out

    @staticmethod
    def _top(logits: torch.Tensor, k: int | None) -> list[tuple[int, float]] | None:
        if not k:
            return None
        values, ids = top_logprobs(logits, k)
        return list(zip(ids.tolist(), values.tolist(), strict=True))

    def _tokens(self, logits: torch.Tensor, ids: list[int], params: SamplingParams | None,
                k: int | None) -> list[Token]:
        """Tokens ``ids`` with their log-probs under ``logits`` (len(ids), vocab)."""
        if not ids:
            return []
        target = torch.tensor(ids, device=logits.device)
        raw, processed = token_logprobs(logits, target, params)
        tops = [self._top(row, k) for row in logits] if k else [None] * len(ids)
        return [Token(t, float(a), float(b), top) for t, a, b, top
                in zip(ids, raw.tolist(), processed.tolist(), tops, strict=True)]

    # ---------------------------------------------------------------- plain decoding
    def _plain_step(self, count: int) -> list[tuple[Sequence, list[Token]]]:
        seqs = self.running[:count]
        ids = torch.tensor([[s.last] for s in seqs], device=self.device)
        if self.speculative:  # the MTP layer will need these positions' hidden states
            self.cache.open(slice(0, count), 1)
            out = self.execution.forward(self.model, ids, self.cache)
            self.cache.close()
            logits = out.logits[:, -1]
        else:
            logits = self.execution.decode(self.model, ids, self.cache)
        tokens = self._choose(logits, seqs)
        for i, (s, t) in enumerate(zip(seqs, tokens, strict=True)):
            s.last = t[0].id
            s.tokens += t
            if self.speculative:
                s.mtp_behind.append((out.hidden_states[i:i + 1], t[0].id))
                if len(s.mtp_behind) >= MTP_BEHIND_MAX:
                    self._catch_up(s)
        return list(zip(seqs, tokens, strict=True))

    def _catch_up(self, s: Sequence) -> None:
        """Commit the positions a sequence decoded with plain steps to the MTP layer, in one pass."""
        hidden = torch.cat([h for h, _ in s.mtp_behind], dim=1)
        next_ids = torch.tensor([[t for _, t in s.mtp_behind]], device=self.device)
        x, normed = self._mtp_forward(slice(s.slot, s.slot + 1), hidden, next_ids)
        s.draft_state = (x[:, -1:], normed[:, -1:])
        s.mtp_behind.clear()

    # ---------------------------------------------------------------- speculative decoding
    def _speculative_step(self, count: int) -> list[tuple[Sequence, list[Token]]]:
        seqs = self.running[:count]
        b, k, m = len(seqs), self.draft_tokens, self.model
        rows = slice(0, b)
        t0 = time.perf_counter()
        drafts = self._draft(seqs, rows, k)  # (b, k)
        t1 = time.perf_counter()
        ids = torch.cat([torch.tensor([[s.last] for s in seqs], device=self.device), drafts], dim=1)
        self.cache.open(rows, k + 1, tracking=True)
        out = self.execution.verify(m, ids, self.cache)
        logits = out.logits.float()  # (b, k+1, vocab)
        # the token plain decoding would draw at each verified position (draw len(tokens) + j)
        targets = sample(logits.flatten(0, 1), [s.params for s in seqs for _ in range(k + 1)],
                         [(s.seed, len(s.tokens) + j) for s in seqs for j in range(k + 1)])
        keep, result = [], []
        draft_rows = drafts.tolist()
        for i, s in enumerate(seqs):
            at = slice(i * (k + 1), (i + 1) * (k + 1))
            n = accepted(draft_rows[i], targets.tokens[at].tolist())
            tokens = [Token(int(t), float(a), float(p), self._top(logits[i, j], s.params.logprobs))
                      for j, (t, a, p) in enumerate(zip(targets.tokens[at][:n + 1],
                                                        targets.logprob[at][:n + 1],
                                                        targets.processed_logprob[at][:n + 1], strict=True))]
            keep.append(n + 1)
            s.tokens += tokens
            s.last = tokens[-1].id
            s.stats.rounds += 1
            s.stats.drafted += k
            s.stats.accepted += n
            s.stats.emitted += n + 1
            result.append((s, tokens))
        self.cache.keep(keep)
        t2 = time.perf_counter()
        next_ids = torch.tensor([[t.id for t in toks] + [toks[-1].id] * (k + 1 - len(toks))
                                 for _, toks in result], device=self.device)
        self._mtp_commit(rows, out.hidden_states, next_ids, keep, seqs)
        st = self.stats
        st.rounds += b
        st.drafted += b * k
        st.accepted += sum(keep) - b
        st.emitted += sum(keep)
        st.draft_s += t1 - t0
        st.verify_s += t2 - t1
        st.commit_s += time.perf_counter() - t2
        return result

    def _draft(self, seqs: list[Sequence], rows: slice, k: int) -> torch.Tensor:
        """k draft tokens per sequence from the MTP layer, fed its own output after the first, each
        drawn with the noise of the token it guesses; the MTP cache is put back afterwards. (b, k)."""
        m = self.model
        for s in seqs:
            if s.mtp_behind:
                self._catch_up(s)
        x = torch.cat([s.draft_state[0] for s in seqs])
        normed = torch.cat([s.draft_state[1] for s in seqs])
        snap = self.mtp_cache.snapshot(rows)
        drafts = []
        for j in range(k):
            logits = self.execution.head(m, normed[:, -1])
            token = sample(logits, [s.params for s in seqs], [(s.seed, len(s.tokens) + j) for s in seqs],
                           logprobs=False).tokens.to(self.device)
            drafts.append(token)
            if j + 1 < k:
                x, normed = self._mtp_forward(rows, x, token[:, None])
        self.mtp_cache.restore(snap)
        return torch.stack(drafts, dim=1)
