"""Sampling: one request's settings (:class:`SamplingParams`), the distribution they turn logits into,
the draw, and the log-probs of the chosen tokens.

The processed distribution is ``softmax(filters(logits / temperature))`` with, in this order, top-k
(the k most likely tokens), top-p (the smallest set whose probability reaches p) and min-p (tokens at
least ``min_p`` times as likely as the most likely one). A temperature below :data:`GREEDY_BELOW`
(0 included) is greedy: the argmax, whose processed distribution is a point mass. Logits are shifted
by their maximum before they are divided by the temperature, so a tiny temperature cannot overflow.

Every chosen token comes with two log-probs: under the raw distribution ``log_softmax(logits)`` and
under the processed one. :func:`token_logprobs` computes both for given tokens; the sampler and the
teacher-forced scorer (:mod:`kinetic.infer.scoring`) both call it, so they report the same numbers for
the same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's threshold)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64  # most tokens to generate (the context limit may end a sequence sooner)
    temperature: float = 1.0  # 0 (or below 1e-5) = greedy (argmax)
    top_k: int = 0  # sample among the k most likely tokens; 0 = all
    top_p: float = 1.0  # sample among the smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less than min_p times as likely as the most likely one; 0 = off
    seed: int | None = None  # the draws' seed (sample j of a request: seed + j); None = fresh randomness
    stop_token_ids: tuple[int, ...] = ()  # ids that end a sequence, besides the model's EOS ids
    stop_strings: tuple[str, ...] = ()  # text that ends a sequence; it is cut from the output
    ignore_eos: bool = False  # do not stop at the model's EOS ids
    logprobs: int | None = None  # report each new token's log-probs, with this many top alternatives
    prompt_logprobs: int | None = None  # also score the prompt's tokens (teacher-forced), with top-k
    reasoning_budget: int | None = None  # reasoning tokens before </think> is forced (reasoning templates)
    reasoning_slack: int = 32  # past the budget, </think> waits this long at most for a line's end

    def __post_init__(self) -> None:
        stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
        object.__setattr__(self, "stop_strings", stops)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens",
               self.max_new_tokens, "an integer >= 0")
        _check(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
               and math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
               self.temperature, "a finite number >= 0 (0 = greedy)")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1, "min_p", self.min_p,
               "in [0, 1] (0 = off)")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "non-negative token ids")
        _check(all(isinstance(s, str) and s for s in stops), "stop_strings", stops, "non-empty strings")
        budget = self.reasoning_budget
        _check(budget is None or (_is_int(budget) and budget >= 0), "reasoning_budget", budget,
               "None or an integer >= 0")
        _check(_is_int(self.reasoning_slack) and self.reasoning_slack >= 0, "reasoning_slack",
               self.reasoning_slack, "an integer >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 0), name, value,
                   "None or an integer >= 0 (the number of top alternatives)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, value, want: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: it must be {want}")


# ---------------------------------------------------------------------- filters
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (..., vocab) with all but the k largest of each row set to -inf (ties kept); k=0 = off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to >= p."""
    if p >= 1:
        return logits
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p  # the set already reached p without this token
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``p`` times the most likely token's."""
    if p <= 0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(p)
    return logits.masked_fill(logits < threshold, -math.inf)


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs (..., vocab) of the distribution ``params`` samples from; greedy: 0 at the argmax
    (the first one on ties) and -inf elsewhere."""
    logits = logits.float()
    if params.greedy:
        out = torch.full_like(logits, -math.inf)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    scaled = min_p_filter(top_p_filter(top_k_filter(scaled, params.top_k), params.top_p), params.min_p)
    return scaled.log_softmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` (...,) under the raw distribution of ``logits`` (..., vocab) and under
    the one ``params`` samples from (the raw one again when ``params`` is None). Differentiable."""
    index = tokens.unsqueeze(-1)
    raw = logits.float().log_softmax(dim=-1)
    raw_lp = raw.gather(-1, index).squeeze(-1)
    if params is None:
        return raw_lp, raw_lp
    return raw_lp, processed_logprobs(logits, params).gather(-1, index).squeeze(-1)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row under the raw distribution: (log-probs, ids)."""
    return logits.float().log_softmax(dim=-1).topk(k, dim=-1)


# ---------------------------------------------------------------------- drawing
MASK64 = 2**64 - 1


def sequence_seed(seed: int | None) -> int:
    """A sequence's 64-bit seed: the request's (modulo 2**64), or fresh randomness."""
    import secrets

    return (secrets.randbits(63) if seed is None else seed) & MASK64


def _mix(seed: int, index: int) -> int:
    """A 64-bit seed for draw ``index`` of the sequence seeded ``seed`` (SplitMix64's finaliser)."""
    x = (seed + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def gumbel_noise(keys: list[tuple[int, int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise (rows, vocab); row i is a function of ``keys[i]`` = (sequence seed, index
    of the token it draws) alone. ``argmax(log p + noise)`` is then a draw from p (the Gumbel-max
    trick), and a sequence's i-th token is the same draw whatever shares its batch and however the
    decoder reached it (see :mod:`kinetic.infer.decoder` on speculative sampling)."""
    if not keys:
        return torch.empty(0, vocab, device=device)
    generator = torch.Generator(device=device)
    rows = []
    for seed, index in keys:
        generator.manual_seed(_mix(seed, index))
        rows.append(torch.rand(vocab, generator=generator, device=device))
    return -torch.log(-torch.log(torch.stack(rows)))  # u = 0 gives -inf: that token never wins


@dataclass
class Choice:
    """Tokens chosen for a batch of rows, with their log-probs (tensors on the host)."""

    tokens: torch.Tensor  # (b,) long
    logprob: torch.Tensor  # (b,) under the raw distribution
    processed_logprob: torch.Tensor  # (b,) under the distribution sampled from


def sample(logits: torch.Tensor, params: list[SamplingParams], keys: list[tuple[int, int]],
           logprobs: bool = True) -> Choice:
    """The token of each row of ``logits`` (b, vocab), row i with ``params[i]``: the argmax when
    greedy, else ``argmax(processed log-probs + gumbel_noise(keys[i]))``, a draw from the processed
    distribution (rows with the same settings are processed together). ``logprobs=False`` (drafts)
    skips the chosen tokens' log-probs (the Choice then holds zeros)."""
    rows, vocab = logits.shape
    tokens = logits.argmax(-1)
    if not logprobs and all(p.greedy for p in params):
        return Choice(tokens.cpu(), torch.zeros(rows), torch.zeros(rows))
    processed_lp = torch.zeros(rows, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
    for members in groups.values():
        index = torch.tensor(members, device=logits.device)
        lp = processed_logprobs(logits.index_select(0, index), params[members[0]])
        chosen = (lp + gumbel_noise([keys[i] for i in members], vocab, logits.device)).argmax(-1)
        tokens.index_copy_(0, index, chosen)
        processed_lp.index_copy_(0, index, lp.gather(-1, chosen[:, None])[:, 0])
    if not logprobs:
        return Choice(tokens.cpu(), torch.zeros(rows), torch.zeros(rows))
    raw = logits.float().log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
    return Choice(tokens.cpu(), raw.cpu(), processed_lp.cpu())
