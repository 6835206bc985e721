"""Generation engine: prompts in, continuations out -- batched, greedy or sampled, streamed.

``Engine(model, tokenizer).generate(prompts, SamplingParams(...))`` returns one
:class:`GenerationResult` per prompt (token ids, text, finish reason, usage); ``stream(prompt, ...)``
yields :class:`Delta` pieces of text as they become stable. Sampling is temperature -> top-k ->
top-p -> multinomial with a per-sequence ``torch.Generator``, so a seeded prompt gives the same text
whatever else shares its batch.

One sequence at a time, by design for now. The model has no attention padding mask, and left padding
would also run through the Mamba recurrence and change its state, so prompts of different lengths
cannot share a padded batch without changing their outputs. Each sequence is prefilled into its own
InferenceCache and decoded with batch size 1; a batch is served by stepping its sequences in turn
(round robin) -- the loop the server's scheduler runs too, so concurrent clients share the model
fairly and every result equals that prompt's solo result exactly. The price is decode throughput
(the batch dimension goes unused); batching decode needs per-sequence KV lengths in attention (a
mask or a paged cache).

Text is emitted only once it is stable: byte-level BPE can split a UTF-8 character over several
tokens, so a piece whose decoding ends in U+FFFD waits for the next token, and text that could be the
start of a stop string is held back until it is known not to be one.

Speculative decoding (:mod:`kinetic.infer.speculative`) is on by default when the checkpoint has MTP
layers: each step after the prefill drafts ``draft_tokens`` tokens with the MTP layer and verifies them
in one pass, so a step can add several tokens. Greedy output is the plain greedy output token for
token; sampled output has the same distribution (not the same draws) as plain sampling with that seed.

``compile_decode=True`` (``--compile``) runs decode steps on a fixed-shape static cache instead: on
CPU ``torch.compile``d steps shared by all sequences of a capacity bucket -- plain steps, or with
speculative decoding whole fixed-shape rounds (:mod:`kinetic.infer.static_speculative`; the first
compilation takes seconds); on CUDA one CUDA graph per sequence, plain steps only (speculative
decoding is turned off there).

Prompts are prefilled in chunks of ``prefill_chunk`` tokens, so activation memory is bounded by the
chunk; each sequence's KV buffers are reserved once at prompt + completion length
(``Engine.memory_budget`` says how much that is before anything runs).

The commands ``kinetic generate`` and ``kinetic chat`` are thin wrappers over this engine.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kinetic.data.tokenizer import encode
from kinetic.infer.cache import InferenceCache, cache_budget, format_budget
from kinetic.infer.chat_template import ChatTemplate, check_unicode
from kinetic.infer.sampling import top_k_filter, top_p_filter
from kinetic.infer.speculative import SpecStats, SpeculativeDecoder, prefill, target_distribution
from kinetic.infer.static_cache import bucket_capacity, static_decoder
from kinetic.infer.static_speculative import StaticSpeculativeDecoder

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64  # most tokens to generate (the context limit may end a sequence sooner)
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # sample among the k most likely tokens; 0 = all
    top_p: float = 1.0  # sample among the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seed of this sequence's generator; None = fresh randomness
    stop_token_ids: tuple[int, ...] = ()  # ids that end a sequence, besides the model's EOS ids
    stop_strings: tuple[str, ...] = ()  # text that ends a sequence; it is cut from the output
    ignore_eos: bool = False  # do not stop at the model's EOS ids

    def __post_init__(self) -> None:
        stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
        object.__setattr__(self, "stop_strings", stops)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens",
               self.max_new_tokens, "an integer >= 0")
        _check(isinstance(self.temperature, Real) and math.isfinite(self.temperature)
               and self.temperature >= 0, "temperature", self.temperature,
               "a finite number >= 0 (0 = greedy)")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(isinstance(self.top_p, Real) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "non-negative token ids")
        _check(all(isinstance(s, str) and s for s in stops), "stop_strings", stops, "non-empty strings")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, value, want: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it must be {want}")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids, including the stop token that ended the sequence, if any
    text: str  # their text, without special tokens and cut before a stop string
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens or the context)
    usage: Usage


@dataclass
class Delta:
    """What one decode step added: stable text (may be empty) and the new token ids."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # set on the sequence's last delta


# ---------------------------------------------------------------------- sampling
def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token id from one position's logits (vocab,)."""
    if params.temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / params.temperature
    scaled = top_p_filter(top_k_filter(scaled, params.top_k), params.top_p)
    return int(torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator))


# ---------------------------------------------------------------------- text
class Detokenizer:
    """Incremental decoding that only returns complete characters.

    Decodes the tokens after the last emitted boundary together with the tokens before it, and
    returns the difference once it no longer ends in a partial UTF-8 character (U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the tokens decoded together (a character boundary)
        self._read = 0  # end of the tokens whose text has been returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is pending, partial characters included (as U+FFFD): the sequence is over."""
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class GenerationSequence:
    """One prompt's generation state: its cache, its sampler, the output so far and stop bookkeeping.

    ``advance(token)`` holds all text logic (stop tokens/strings, limits) and needs no model."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_ids: Sequence[int],
                 max_context: int, tokenizer: Tokenizer, device: torch.device) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = frozenset(stop_ids)
        self.max_context = max_context
        self.cache = InferenceCache()
        self.generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed & (2**64 - 1))  # torch takes unsigned 64-bit seeds
        self.token_ids: list[int] = []
        self.text = ""  # output text so far (stable or held back)
        self.emitted = 0  # characters of ``text`` already returned in deltas
        self.finish_reason: str | None = FINISH_LENGTH if params.max_new_tokens == 0 else None
        self.spec: SpeculativeDecoder | None = None  # set at prefill when decoding speculatively
        self.decoder = None  # a compiled/graph decode step, set at prefill with compile_decode
        self.capacity = 0  # tokens its cache is reserved for (set by Engine.start)
        self._detok = Detokenizer(tokenizer)
        self._longest_stop = max(map(len, params.stop_strings), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_input(self) -> list[int]:
        """The whole prompt on the first step (prefill), then the last sampled token."""
        return self.token_ids[-1:] or self.prompt_ids

    def advance(self, token: int) -> Delta:
        assert not self.finished, "advance() on a finished sequence"
        self.token_ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = FINISH_STOP
            new = self._detok.flush()  # the stop token itself is never shown
        else:
            new = self._detok.push(token)
            if (len(self.token_ids) >= self.params.max_new_tokens
                    or len(self.prompt_ids) + len(self.token_ids) >= self.max_context):
                self.finish_reason = FINISH_LENGTH
                new += self._detok.flush()
        return Delta(self._emit(new), [token], self.finish_reason)

    def _emit(self, new: str) -> str:
        stops = self.params.stop_strings
        start = max(0, len(self.text) - self._longest_stop + 1)  # a new match must touch the new text
        self.text += new
        hold = 0
        if stops:
            hits = [i for s in stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = FINISH_STOP
            elif not self.finished:
                hold = _held_back(self.text, stops)
        end = len(self.text) - hold
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def result(self) -> GenerationResult:
        assert self.finished, "result() before the sequence finished"
        return GenerationResult(list(self.token_ids), self.text, self.finish_reason,
                                Usage(len(self.prompt_ids), len(self.token_ids)))


# ---------------------------------------------------------------------- engine
class Engine:
    """A model + tokenizer that generate text (see the module docstring).

    ``max_context`` caps prompt + generated tokens (default: the config's max_position_embeddings).
    ``speculative`` (default: when the model has MTP layers) drafts ``draft_tokens`` tokens per step
    with MTP; ``prefill_chunk`` bounds the tokens of one prefill pass.
    The model is put in eval mode. Not thread-safe: the model runs on the caller's thread; the
    server serializes calls."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_context: int | None = None,
                 chat_template: ChatTemplate | None = None, speculative: bool | None = None,
                 draft_tokens: int = 2, prefill_chunk: int = 8192, compile_decode: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = model.config.vocab_size
        self.max_context = max_context or model.config.max_position_embeddings
        if self.max_context < 2:
            raise ValueError(f"max_context={self.max_context} must be >= 2 (a prompt token and a new one)")
        self.chat_template = chat_template or ChatTemplate()
        self.device = next(model.parameters()).device
        self.eos_token_ids = tuple(model.config.eos_token_ids)
        has_mtp = getattr(model, "mtp", None) is not None
        if speculative and not has_mtp:
            raise ValueError("speculative=True needs a checkpoint with MTP layers (config "
                             "num_nextn_predict_layers >= 1); this one has none")
        graphs = bool(compile_decode) and self.device.type == "cuda"
        if speculative and graphs:
            raise ValueError("speculative decoding does not run on CUDA graphs yet: choose speculative=True "
                             "or compile_decode=True on CUDA (there --compile implies --no-speculative)")
        self.compile_decode = bool(compile_decode)
        self.speculative = (has_mtp and not graphs) if speculative is None else bool(speculative)
        if not _is_int(draft_tokens) or draft_tokens < 0:
            raise ValueError(f"draft_tokens={draft_tokens!r} must be an integer >= 0")
        if not _is_int(prefill_chunk) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk!r} must be an integer >= 1")
        self.draft_tokens = draft_tokens
        self.prefill_chunk = prefill_chunk
        self.spec_stats = SpecStats()  # summed over every sequence's speculative rounds

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                        max_context: int | None = None, **options) -> Engine:
        """Load a checkpoint directory (or a run directory's latest checkpoint) with its
        ``tokenizer.json`` and chat template."""
        import kinetic
        from kinetic.data.tokenizer import TOKENIZER_FILE, load_tokenizer
        from kinetic.eval import resolve_checkpoint

        path = resolve_checkpoint(path)
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {TOKENIZER_FILE}; pretrain with a corpus or copy the "
                                    "corpus tokenizer there")
        model = kinetic.from_pretrained(path, dtype=dtype, device=device)
        return cls(model, load_tokenizer(path / TOKENIZER_FILE), max_context=max_context,
                   chat_template=ChatTemplate.from_pretrained(path), **options)

    def memory_budget(self, tokens: int) -> dict:
        """Bytes one sequence of ``tokens`` tokens needs: its cache (KV of the attention layers +
        constant Mamba state, MTP layers included when speculative) and the weights."""
        dtype = next(self.model.parameters()).dtype
        out = cache_budget(self.model.config, tokens, dtype=dtype, mtp=self.speculative)
        out["weights"] = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return out

    def describe_budget(self, tokens: int) -> str:
        budget = self.memory_budget(tokens)
        return format_budget(budget, budget["weights"])

    # ---- prompts
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a text prompt, or a checked copy of an id prompt."""
        if isinstance(prompt, str):
            check_unicode(prompt, "the prompt")
            return encode(self.tokenizer, prompt)
        ids = list(prompt)
        bad = [t for t in ids if not _is_int(t) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        return ids

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Prompt ids for chat ``messages``, ending with the assistant's turn opener."""
        return self.chat_template.encode(self.tokenizer, messages)

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        return tuple(self.chat_template.stop_token_ids(self.tokenizer))

    def start(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> GenerationSequence:
        """A new sequence for ``prompt``; nothing runs until ``step``. Raises ValueError for an empty
        prompt or one that leaves no room in the context."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context limit is {self.max_context} "
                             "tokens (prompt + completion)")
        stop_ids = (() if params.ignore_eos else self.eos_token_ids) + params.stop_token_ids
        seq = GenerationSequence(ids, params, stop_ids, self.max_context, self.tokenizer, self.device)
        seq.capacity = self.capacity(len(ids), params.max_new_tokens)
        seq.cache.reserve(seq.capacity)
        return seq

    def capacity(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Tokens a sequence's cache is reserved for: prompt + completion (within the context limit),
        rounded up to a capacity bucket with ``compile_decode`` (sequences of one bucket share a
        compiled step), plus the positions a speculative verification writes past the last token."""
        room = min(prompt_tokens + max_new_tokens, self.max_context)
        if self.compile_decode:
            room = bucket_capacity(room)
        return room + (self.draft_tokens + 1 if self.speculative else 0)


    # ---- running
    @torch.inference_mode()  # per thread: the server's worker thread needs it as much as the caller
    def step(self, seq: GenerationSequence) -> Delta:
        """One model call for ``seq``: prefill on its first step, then one decode step."""
        if seq.finished:
            return Delta("", [], seq.finish_reason)
        params = seq.params
        if not seq.token_ids:  # prefill, in chunks
            if self.speculative:
                seq.spec = SpeculativeDecoder(
                    self.model, seq.cache, target_distribution(params.temperature, params.top_k,
                                                               params.top_p), seq.generator,
                    totals=self.spec_stats)
            token = prefill(self.model, seq.cache, seq.prompt_ids, self.prefill_chunk, seq.spec,
                            pick=lambda logits: sample_token(logits, params, seq.generator))
            delta = seq.advance(token)
            if self.compile_decode and not seq.finished:
                if seq.spec is not None and self.draft_tokens > 0:  # fixed-shape compiled rounds
                    seq.decoder = StaticSpeculativeDecoder(seq.spec, self.draft_tokens, seq.capacity)
                else:
                    seq.decoder = static_decoder(self.model, seq.cache, seq.capacity)
            return delta
        if isinstance(seq.decoder, StaticSpeculativeDecoder):
            return self._advance_all(seq, seq.decoder.round())
        if seq.decoder is not None:
            ids = torch.tensor([seq.next_input()], device=self.device)
            return seq.advance(sample_token(seq.decoder.step(ids)[0], params, seq.generator))
        if seq.spec is None:
            ids = torch.tensor([seq.next_input()], device=self.device)
            logits = self.model(ids, seq.cache, return_mtp=False, logits_to_keep=1).logits[0, -1]
            return seq.advance(sample_token(logits, params, seq.generator))
        done = len(seq.token_ids)
        room = min(params.max_new_tokens - done, self.max_context - len(seq.prompt_ids) - done)
        return self._advance_all(seq, seq.spec.round(max(0, min(self.draft_tokens, room - 1))))

    @staticmethod
    def _advance_all(seq: GenerationSequence, tokens: list[int]) -> Delta:
        """Feed a speculative round's tokens to ``seq``; a stop token or string, or the length limit,
        may end it inside the round (the rest are dropped)."""
        text, ids = [], []
        for token in tokens:
            delta = seq.advance(token)
            text.append(delta.text)
            ids += delta.token_ids
            if seq.finished:
                break
        return Delta("".join(text), ids, seq.finish_reason)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """One result per prompt; ``params`` is shared or one per prompt."""
        if isinstance(prompts, str) or (len(prompts) and _is_int(prompts[0])):
            raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list")
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        seqs = [self.start(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
        active = [s for s in seqs if not s.finished]
        while active:  # round robin: each unfinished sequence advances one token per pass
            for s in active:
                self.step(s)
            active = [s for s in active if not s.finished]
        return [s.result() for s in seqs]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Deltas of one prompt's generation: one per step that added text, and a final one with the
        finish_reason; a delta's token_ids include those of the steps that added no text."""
        seq = self.start(prompt, params)
        if seq.finished:
            yield Delta("", [], seq.finish_reason)
        ids: list[int] = []
        while not seq.finished:
            delta = self.step(seq)
            ids += delta.token_ids
            if delta.text or delta.finish_reason:
                yield Delta(delta.text, ids, delta.finish_reason)
                ids = []
