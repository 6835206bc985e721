"""Generation engine: prompts in, continuations out -- batched, greedy or sampled, streamed.

``Engine(model, tokenizer).generate(prompts, SamplingParams(...))`` returns one
:class:`GenerationResult` per prompt (token ids, text, finish reason, usage, log-probs);
``stream(prompt, ...)`` yields :class:`Delta` pieces of text as they become stable. The engine adds
text to the :class:`~kinetic.infer.decoder.Decoder`: it encodes prompts, turns tokens into stable text,
and ends sequences at stop tokens, stop strings and length limits. Every sequence it starts joins the
decoder's running batch (continuous batching); ``start`` / ``step`` / ``cancel`` are the calls the
server's worker makes, ``generate`` and ``stream`` loop over them.

Sampling (:mod:`kinetic.infer.sampling`): temperature -> top-k -> top-p -> min-p -> a draw whose noise
depends only on the request's seed and the token's index; a seeded prompt gives the same text
whatever else shares its batch, speculative or not (up to the float rounding of a different batch
size, which can flip a near-tie).

Text is emitted only once it is stable: byte-level BPE can split a UTF-8 character over several
tokens, so a piece whose decoding ends in U+FFFD waits for the next token, and text that could be the
start of a stop string is held back until it is known not to be one.

Speculative decoding (the decoder's MTP policy) is on by default when the checkpoint has MTP layers:
a step drafts ``draft_tokens`` tokens per sequence and verifies them in one pass (while one sequence
runs; a bigger batch takes plain steps). The output is plain decoding's token for token, greedy or
sampled with the same seed. ``compile_decode=True`` (``--compile``) runs the plain decode
step through ``torch.compile`` (CUDA graphs on CUDA) and turns speculative decoding off.

Prompts are prefilled in chunks of ``prefill_chunk`` tokens, so activation memory is bounded by the
chunk (``Engine.memory_budget`` says what the cache needs before anything runs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kinetic.data.tokenizer import encode
from kinetic.infer import decoder as _decoder
from kinetic.infer.cache import cache_budget, format_budget
from kinetic.infer.chat_template import ChatTemplate, check_unicode
from kinetic.infer.decoder import Decoder, SpecStats, Token
from kinetic.infer.execution import Compiled
from kinetic.infer.sampling import SamplingParams, _is_int

FINISH_STOP, FINISH_LENGTH = "stop", "length"
__all__ = ["Delta", "Engine", "GenerationResult", "GenerationSequence", "SamplingParams", "Usage"]


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
    tokens: list[Token] = field(default_factory=list)  # the ids with their log-probs
    prompt_logprobs: list[Token | None] | None = None  # with SamplingParams.prompt_logprobs
    reasoning: str | None = None  # the reasoning before </think>, when the prompt opened <think>


@dataclass
class Delta:
    """What one decode step added: stable text (may be empty) and the new tokens."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # set on the sequence's last delta
    tokens: list[Token] = field(default_factory=list)  # the new ids with their log-probs
    reasoning: str = ""  # new reasoning text (inside <think>), kept apart from ``text``


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
    """One prompt's text state over a decoder sequence: the output so far and stop bookkeeping.
    ``advance(token)`` holds all text logic (stop tokens/strings, limits) and needs no model.

    With ``think`` = (the ``<think>`` id, the ``</think>`` id) and a prompt that ends with ``<think>``
    (a reasoning chat template's generation prompt), the tokens up to ``</think>`` are reasoning: their
    text goes to ``reasoning`` (no stop strings apply to it) and the answer's to ``text``."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_ids: Sequence[int],
                 max_context: int, tokenizer: Tokenizer, state: _decoder.Sequence | None = None,
                 think: tuple[int, int] | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = frozenset(stop_ids)
        self.max_context = max_context
        self.state = state  # the decoder's sequence (None for text-only use)
        self.token_ids: list[int] = []
        self.tokens: list[Token] = []
        self.text = ""  # output text so far (stable or held back)
        self.emitted = 0  # characters of ``text`` already returned in deltas
        self.finish_reason: str | None = FINISH_LENGTH if params.max_new_tokens == 0 else None
        self._detok = Detokenizer(tokenizer)
        self._longest_stop = max(map(len, params.stop_strings), default=0)
        self.think_end = think[1] if think else None
        self.reasoning_open = bool(think) and bool(prompt_ids) and prompt_ids[-1] == think[0]
        self.reasoning: str | None = "" if self.reasoning_open else None
        self.reasoning_tokens = 0
        self.forcing = False  # </think> has been forced (reasoning budget)
        self._reasoning_detok = Detokenizer(tokenizer)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_logprobs(self) -> list[Token | None] | None:
        return None if self.state is None else self.state.prompt_logprobs

    def advance(self, token: int) -> Delta:
        assert not self.finished, "advance() on a finished sequence"
        if self.reasoning_open:
            return self._advance_reasoning(token)
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

    def _advance_reasoning(self, token: int) -> Delta:
        self.token_ids.append(token)
        if token == self.think_end:
            self.reasoning_open = False
            piece = self._reasoning_detok.flush()
        elif token in self.stop_ids:
            self.finish_reason = FINISH_STOP
            piece = self._reasoning_detok.flush()
        else:
            self.reasoning_tokens += 1
            piece = self._reasoning_detok.push(token)
            if (len(self.token_ids) >= self.params.max_new_tokens
                    or len(self.prompt_ids) + len(self.token_ids) >= self.max_context):
                self.finish_reason = FINISH_LENGTH
                piece += self._reasoning_detok.flush()
        self.reasoning += piece
        return Delta("", [token], self.finish_reason, reasoning=piece)

    def budget_spent(self, piece: str, ahead: int = 0) -> bool:
        """Whether the reasoning budget calls for ``</think>`` now: at the first line end past the
        budget, or when budget + slack tokens would be passed within the next ``ahead`` + 1 tokens
        (a speculative step can emit several)."""
        budget = self.params.reasoning_budget
        if not self.reasoning_open or budget is None or self.forcing:
            return False
        n = self.reasoning_tokens
        return n + ahead + 1 >= budget + self.params.reasoning_slack or (n >= budget and "\n" in piece)

    def advance_all(self, tokens: list[Token]) -> Delta:
        """Feed one step's tokens; a stop token or string, or the length limit, may end the sequence
        inside them (the rest are dropped)."""
        text, ids, kept, reasoning = [], [], [], []
        for token in tokens:
            delta = self.advance(token.id)
            text.append(delta.text)
            reasoning.append(delta.reasoning)
            ids.append(token.id)
            kept.append(token)
            if self.finished:
                break
        self.tokens += kept
        return Delta("".join(text), ids, self.finish_reason, kept, "".join(reasoning))

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
                                Usage(len(self.prompt_ids), len(self.token_ids)), list(self.tokens),
                                self.prompt_logprobs, self.reasoning)


# ---------------------------------------------------------------------- engine
class Engine:
    """A model + tokenizer that generate text (see the module docstring).

    ``max_context`` caps prompt + generated tokens (default: the config's max_position_embeddings).
    ``max_batch`` bounds the sequences decoded together; ``speculative`` (default: when the model
    has MTP layers and ``compile_decode`` is off) drafts ``draft_tokens`` tokens per step with MTP
    while at most ``speculative_max_batch`` sequences run;
    ``prefill_chunk`` bounds the tokens of one prefill pass. The model is put in eval mode. Not
    thread-safe: the model runs on the caller's thread; the server makes every call from one worker."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_context: int | None = None,
                 chat_template: ChatTemplate | None = None, speculative: bool | None = None,
                 draft_tokens: int = 2, prefill_chunk: int = 8192, compile_decode: bool = False,
                 max_batch: int = 16, speculative_max_batch: int = 1) -> None:
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
        if speculative and compile_decode:
            raise ValueError("compile_decode compiles the plain decode step: choose speculative=True or "
                             "compile_decode=True (--compile implies --no-speculative)")
        self.compile_decode = bool(compile_decode)
        self.speculative = (has_mtp and not compile_decode) if speculative is None else bool(speculative)
        if not _is_int(draft_tokens) or draft_tokens < 0:
            raise ValueError(f"draft_tokens={draft_tokens!r} must be an integer >= 0")
        if not _is_int(prefill_chunk) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk!r} must be an integer >= 1")
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} must be an integer >= 1")
        self.draft_tokens = draft_tokens
        self.prefill_chunk = prefill_chunk
        self.decoder = Decoder(model, max_batch=max_batch, speculative=self.speculative,
                               draft_tokens=draft_tokens, prefill_chunk=prefill_chunk,
                               execution=Compiled() if compile_decode else None,
                               speculative_max_batch=speculative_max_batch)
        self._live: dict[int, GenerationSequence] = {}  # id(decoder sequence) -> its text state
        think, end = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
        self.think_ids = (think, end) if think is not None and end is not None else None

    @property
    def spec_stats(self) -> SpecStats:
        """Every speculative round so far."""
        return self.decoder.stats

    @property
    def max_batch(self) -> int:
        return self.decoder.max_batch

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

    def capacity(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """KV positions a sequence's cache is given: prompt + completion (within the context limit),
        plus the positions a speculative verification writes past the last token."""
        return self.decoder.capacity(prompt_tokens, min(max_new_tokens, self.max_context - prompt_tokens))

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

    def encode_chat(self, messages: Sequence[dict], enable_thinking: bool = True) -> list[int]:
        """Prompt ids for chat ``messages``, ending with the assistant's turn opener
        (``enable_thinking=False``: a pre-closed think block, for a reasoning template)."""
        return self.chat_template.encode(self.tokenizer, messages, enable_thinking=enable_thinking)

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        return tuple(self.chat_template.stop_token_ids(self.tokenizer))

    # ---- running
    def start(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
              n: int = 1) -> list[GenerationSequence]:
        """``n`` samples of ``prompt`` (prefilled once, then decoded with the running batch); nothing
        runs until ``step``. Raises ValueError for an empty prompt or one that leaves no room in
        the context. Sample j's draws are seeded with ``params.seed + j``."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context limit is {self.max_context} "
                             "tokens (prompt + completion)")
        if not _is_int(n) or not 1 <= n <= self.max_batch:
            raise ValueError(f"n={n!r} samples must be an integer in [1, {self.max_batch}] (the batch size)")
        stop_ids = (() if params.ignore_eos else self.eos_token_ids) + params.stop_token_ids
        seqs = [GenerationSequence(ids, params, stop_ids, self.max_context, self.tokenizer,
                                   think=self.think_ids) for _ in range(n)]
        if seqs[0].finished and params.prompt_logprobs is None:
            return seqs  # max_new_tokens=0 and nothing to score: nothing to run
        room = replace(params, max_new_tokens=min(params.max_new_tokens, self.max_context - len(ids)))
        states = self.decoder.add(ids, room, n)
        for seq, state in zip(seqs, states, strict=True):
            seq.state = state
            self._live[id(state)] = seq
        return seqs

    @torch.inference_mode()  # per thread: the server's worker thread needs it as much as the caller
    def step(self) -> list[tuple[GenerationSequence, Delta]]:
        """One decoder step over every running sequence; each sequence's delta (finished sequences
        leave the decoder)."""
        out = []
        for state, tokens in self.decoder.step():
            seq = self._live.get(id(state))
            if seq is None:
                continue
            delta = seq.advance_all(tokens) if not seq.finished else Delta("", [], seq.finish_reason)
            if seq.finished:
                self.cancel(seq)
            elif seq.budget_spent(delta.reasoning, self.draft_tokens if self.speculative else 0):
                # end the reasoning: </think> next, then the answer
                seq.forcing = True
                self.decoder.force(state, [seq.think_end])
            out.append((seq, delta))
        return out

    def cancel(self, seq: GenerationSequence) -> None:
        """Stop decoding ``seq`` (finished, or its client is gone) and free its slot."""
        if seq.state is not None:
            self._live.pop(id(seq.state), None)
            self.decoder.cancel(seq.state)

    @property
    def busy(self) -> bool:
        return self.decoder.busy

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 n: int = 1) -> list[GenerationResult]:
        """One result per prompt (``n`` > 1: n results per prompt, prompt-major); ``params`` is shared
        or one per prompt. All prompts are decoded together, ``max_batch`` sequences at a time."""
        if isinstance(prompts, str) or (len(prompts) and _is_int(prompts[0])):
            raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list")
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        seqs = [s for p, sp in zip(prompts, per_prompt, strict=True) for s in self.start(p, sp, n)]
        try:
            while any(s.state is not None and not s.state.done for s in seqs):
                self.step()
        finally:
            for s in seqs:
                self.cancel(s)
        for s in seqs:
            if not s.finished:  # max_new_tokens=0 with prompt log-probs: scored, nothing generated
                s.finish_reason = FINISH_LENGTH
        return [s.result() for s in seqs]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Deltas of one prompt's generation: one per step that added text, and a final one with the
        finish_reason; a delta's token_ids include those of the steps that added no text."""
        (seq,) = self.start(prompt, params)
        if seq.finished:
            self.cancel(seq)
            yield Delta("", [], seq.finish_reason)
            return
        ids: list[int] = []
        tokens: list[Token] = []
        try:
            while not seq.finished:
                for other, delta in self.step():
                    if other is not seq:
                        continue
                    ids += delta.token_ids
                    tokens += delta.tokens
                    if delta.text or delta.finish_reason:
                        yield Delta(delta.text, ids, delta.finish_reason, tokens)
                        ids, tokens = [], []
        finally:
            self.cancel(seq)
