"""OpenAI-compatible HTTP server for an :class:`~kinetic.infer.engine.Engine` (FastAPI + uvicorn).

Endpoints, with the shapes of OpenAI's API and vLLM's extensions:

* ``POST /v1/completions``: text, token-id or batched prompts; ``n``, ``seed``, ``stop`` (a list),
  ``echo``, ``logprobs`` (the legacy format: tokens, token_logprobs, top_logprobs, text_offset; with
  ``echo`` the scored prompt comes first, its first token with null), ``max_tokens: 0`` (with echo and
  logprobs: just the scored prompt -- what lm-evaluation-harness asks for), ``top_k`` / ``min_p``;
* ``POST /v1/chat/completions``: the checkpoint's chat template; ``logprobs`` / ``top_logprobs``;
* both with ``stream: true`` as server-sent events in OpenAI's chunk format ending ``data: [DONE]``;
* ``POST /tokenize`` and ``POST /detokenize`` (vLLM's), ``GET /v1/models``, ``GET /health``, a chat
  page at ``/``, and ``GET /openapi.json``, which describes all of the above as the server answers.

Log-probs are under the raw distribution (``log_softmax`` of the logits, vLLM's default), from the
same logits that chose the token; the top alternatives come from that distribution too.

Concurrency: the model and its caches are not thread-safe, so one worker thread (:class:`Scheduler`)
makes every engine call. Requests are validated and tokenized off the worker, wait in a bounded queue
(full: 429), and are started on the worker (``engine.start``) while the running sequences plus the
request's leave room in ``max_active``; every pass is then one batched ``engine.step`` over all
running sequences (continuous batching: requests join and leave the batch between steps). Deltas go
back to the event loop through ``loop.call_soon_threadsafe``. A client that disconnects -- streaming,
or waiting for a whole answer (its connection is watched while it waits) -- has its sequences
cancelled within a second. An engine error fails the requests it affects and the server goes on.

Errors: client mistakes (malformed JSON, wrong types, unknown model, bad ``max_tokens``, a prompt over
the context, a body over the size limit) get a 4xx with OpenAI's error body ``{"error": {"message",
"type", "param", "code"}}``; validation errors are 400, as in OpenAI's API. Fields that would change the
answer and are not implemented (``tools``, ``response_format``, ``logit_bias``, penalties, ...) are
accepted only with their neutral value; anything else is a 400 naming the field. The schema says the
same, so a request the schema accepts is one the server does not refuse for its form.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from kinetic import __version__
from kinetic.infer.api import (
    REFUSED,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatTemplateKwargs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    StreamOptions,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TokenText,
    documented_responses,
)
from kinetic.infer.decoder import Token
from kinetic.infer.engine import Delta, Engine, GenerationSequence, SamplingParams

log = logging.getLogger("kinetic.serve")
STATIC = Path(__file__).parent / "static"
WATCH_S = 0.2  # how often a waiting non-streaming request looks at its connection


@dataclass
class Limits:
    """What one request may ask for, and how much the server holds; each is a ``kinetic serve`` flag."""

    max_tokens: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # completion length when a request gives none (clipped to the context)
    max_n: int = 8  # choices per request (n x number of prompts)
    max_queue: int = 64  # requests waiting for the worker; more are answered 429
    max_active: int = 8  # sequences decoded together (a larger request runs alone)
    max_request_bytes: int = 1_000_000  # larger request bodies are answered 413


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class _BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reader passes it through unchanged."""


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes``, checked before they are read
    (Content-Length) and while they are read (chunked uploads)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        too_large = APIError(413, f"the request body is over this server's limit of {self.max_bytes} bytes "
                                  "(kinetic serve --max-request-bytes)", code="request_too_large")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge(413, too_large.message)
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------- scheduler
class ClientGone(Exception):
    """The client of a non-streaming request disconnected while it waited."""


class Job:
    """One request: its prompts, each started with ``n`` samples on the worker, and the event-loop
    queue its deltas go to. Choice index = prompt index * n + sample."""

    def __init__(self, prompts: list[list[int]], params: list[SamplingParams], n: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.prompts, self.params, self.n = prompts, params, n
        self.size = len(prompts) * n
        self.seqs: list[GenerationSequence] = []  # set by the worker when it starts the job
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set when the client is gone; the worker then cancels the sequences

    def cancel(self) -> None:
        self.cancelled = True

    def push(self, index: int, item: Delta | BaseException) -> None:
        """Called on the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) until every choice has finished; raises a worker error (or
        ClientGone, pushed by :func:`_watch`)."""
        remaining = self.size
        while remaining:
            index, item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finish_reason is not None
            yield index, item


async def _watch(request: Request, job: Job) -> None:
    """Cancel ``job`` once its client has disconnected (a non-streaming request; Starlette cancels
    a streaming response itself)."""
    while not await request.is_disconnected():
        await asyncio.sleep(WATCH_S)
    job.cancel()
    job.events.put_nowait((0, ClientGone()))


class Scheduler:
    """The one thread that runs the engine: starts queued jobs while the running sequences plus the
    job's fit in ``max_active`` (a larger job starts when nothing runs), then makes one batched
    ``engine.step()`` per pass and routes each sequence's delta to its job."""

    def __init__(self, engine: Engine, max_active: int = 8, max_queue: int = 64) -> None:
        self.engine, self.max_active, self.max_queue = engine, max_active, max_queue
        self._pending: deque[Job] = deque()
        self._running: dict[int, tuple[Job, int, GenerationSequence]] = {}  # id(seq) -> its job, choice
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.peak_active = 0  # most sequences ever running at once (tests check requests overlapped)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kinetic-infer-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        return {"queued": len(self._pending), "active": len(self._running)}

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._pending) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self._pending)} requests are waiting "
                               "(kinetic serve --max-queue); retry later", type="rate_limit_error",
                               code="server_busy")
            self._pending.append(job)
            self._cv.notify()

    def _admit(self) -> list[Job]:
        with self._cv:
            while not (self._pending or self._running or self._stopping):
                self._cv.wait()
            jobs, count = [], len(self._running)
            while self._pending and not self._stopping:
                job = self._pending[0]
                if not job.cancelled and count and count + job.size > self.max_active:
                    break
                self._pending.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    count += job.size
            return jobs

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._pass()
            except Exception as err:  # a bug outside the engine's step: fail what runs, keep serving
                log.exception("the worker failed")
                self._fail({job for job, _, _ in self._running.values()}, err)
        shutdown = RuntimeError("the server is shutting down")
        self._fail({job for job, _, _ in self._running.values()} | set(self._pending), shutdown)

    def _pass(self) -> None:
        for job in self._admit():
            self._start(job)
        self.peak_active = max(self.peak_active, len(self._running))
        for key, (job, _, seq) in list(self._running.items()):
            if job.cancelled:  # the client is gone: free the slot now
                self.engine.cancel(seq)
                del self._running[key]
        if self._running:
            self._step()

    def _start(self, job: Job) -> None:
        seqs: list[GenerationSequence] = []
        try:
            for ids, params in zip(job.prompts, job.params, strict=True):
                seqs += self.engine.start(ids, params, job.n)
        except Exception as err:
            for seq in seqs:
                self.engine.cancel(seq)
            if isinstance(err, ValueError):  # checked before, so a ValueError here is still the client's
                err = APIError(400, str(err), code="invalid_value")
            else:
                log.exception("starting a request failed")
            job.push(0, err)
            return
        job.seqs = seqs
        for index, seq in enumerate(seqs):
            if seq.state is None:  # max_tokens=0 and nothing to score: finished before it ran
                job.push(index, Delta("", [], seq.finish_reason))
            else:
                self._running[id(seq)] = (job, index, seq)

    def _step(self) -> None:
        try:
            out = self.engine.step()
        except Exception as err:  # a bug or out of memory: fail what ran, keep serving
            log.exception("generation failed")
            self._fail({job for job, _, _ in self._running.values()}, err)
            return
        for seq, delta in out:
            entry = self._running.get(id(seq))
            if entry is None:
                continue
            if delta.finish_reason is not None:
                del self._running[id(seq)]
            entry[0].push(entry[1], delta)

    def _fail(self, jobs: set[Job], err: BaseException) -> None:
        for key, (job, _, seq) in list(self._running.items()):
            if job in jobs:
                del self._running[key]
                try:
                    self.engine.cancel(seq)
                except Exception:  # the engine is in a bad way; the job fails all the same
                    log.exception("cancelling a sequence failed")
        for job in jobs:
            job.push(0, err)


# ---------------------------------------------------------------------- request -> sampling params
def _max_tokens(asked: int | None, name: str, prompt_len: int, prompt_name: str, max_context: int,
                limits: Limits) -> int:
    """The completion length for a prompt: ``asked`` (the request's ``name`` field) checked against
    the server's limit and the context, or the default clipped to the room the prompt leaves."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty: give at least one token", param=prompt_name,
                       code="invalid_value")
    if prompt_len >= max_context:
        raise APIError(400, f"this model's maximum context length is {max_context} tokens, but the prompt "
                       f"has {prompt_len} tokens", param=prompt_name, code="context_length_exceeded")
    if asked is None:
        return min(limits.default_max_tokens, max_context - prompt_len)
    if asked > limits.max_tokens:
        raise APIError(400, f"{name}={asked} is over this server's limit of {limits.max_tokens} "
                       "(kinetic serve --max-tokens)", param=name, code="invalid_value")
    if prompt_len + asked > max_context:
        raise APIError(400, f"this model's maximum context length is {max_context} tokens, but "
                       f"{prompt_len + asked} were requested ({prompt_len} in the prompt, {asked} for the "
                       f"completion); lower {name} or shorten the prompt", param=name,
                       code="context_length_exceeded")
    return asked


def _params(engine: Engine, limits: Limits, req: SamplingFields, prompts: list[list[int]], *,
            extra_stop_ids: tuple[int, ...] = (), logprobs: int | None = None,
            prompt_logprobs: int | None = None, reasoning_budget: int | None = None) -> list[SamplingParams]:
    """One SamplingParams per prompt (its max_new_tokens depends on the prompt's length)."""
    chat = isinstance(req, ChatCompletionRequest)
    if chat and req.max_completion_tokens is not None:
        max_tokens, name = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, name = req.max_tokens, "max_tokens"
    n = req.n or 1
    if n * len(prompts) > limits.max_n:
        raise APIError(400, f"{n * len(prompts)} choices requested (n x prompts); this server's limit is "
                       f"{limits.max_n} (kinetic serve --max-n)", param="n", code="invalid_value")
    if n > engine.max_batch:
        raise APIError(400, f"n={n} samples of one prompt is over this engine's batch of "
                       f"{engine.max_batch}", param="n", code="invalid_value")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    out = []
    for ids in prompts:
        max_new = _max_tokens(max_tokens, name, len(ids), "messages" if chat else "prompt",
                              engine.max_context, limits)
        try:  # the schema already bounds every field; a ValueError here is still the client's
            out.append(SamplingParams(
                max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
                top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else req.top_p,
                min_p=req.min_p or 0.0, seed=req.seed, stop_strings=stops, stop_token_ids=extra_stop_ids,
                ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                reasoning_budget=reasoning_budget))
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_value") from None
    return out


def _prompt_ids(engine: Engine, prompt) -> list[list[int]]:
    """Completion prompts as token-id lists: a string, a list of strings, ids, or a list of id lists."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    try:
        return [engine.encode(p) for p in prompt]
    except ValueError as err:  # ids out of range, text that is not valid Unicode
        raise APIError(400, str(err), param="prompt", code="invalid_value") from None


# ---------------------------------------------------------------------- answers
@dataclass
class _Choice:
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    reasoning: str | None = None  # with a reasoning chat format


async def _collect(job: Job, request: Request) -> list[_Choice]:
    """Every choice's whole answer; the client's connection is watched while it waits."""
    choices = [_Choice() for _ in range(job.size)]
    watcher = asyncio.create_task(_watch(request, job))
    try:
        async for index, delta in job.deltas():
            c = choices[index]
            c.text += delta.text
            c.tokens += delta.tokens
            if job.seqs and job.seqs[index].reasoning is not None:
                c.reasoning = (c.reasoning or "") + delta.reasoning
            c.finish_reason = delta.finish_reason or c.finish_reason
    except ClientGone:
        raise APIError(499, "the client closed the connection") from None  # nobody reads this
    except APIError:
        raise
    except Exception as err:
        raise APIError(500, f"generation failed: {err}", type="server_error") from None
    finally:
        watcher.cancel()
        job.cancel()  # a no-op when done; frees the worker when this request was abandoned
    return choices


def _usage(prompts: list[list[int]], seqs: list[GenerationSequence]) -> dict:
    prompt_tokens = sum(map(len, prompts))
    completion_tokens = sum(len(s.token_ids) for s in seqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _CompletionChoices:
    """Completion choices (whole or as stream chunks): echo puts the prompt first, its text and, with
    logprobs, its scored tokens; text offsets run on over a stream's chunks."""

    def __init__(self, engine: Engine, fmt: TokenText, job: Job, echo: bool, logprobs: bool) -> None:
        self.engine, self.fmt, self.job, self.echo, self.logprobs = engine, fmt, job, echo, logprobs
        self.offset = [0] * job.size
        self.started = [False] * job.size

    def choice(self, index: int, text: str, tokens: list[Token], finish: str | None) -> dict:
        items: list[tuple[int, Token | None]] = []
        if not self.started[index]:
            self.started[index] = True
            if self.echo:
                prompt = self.job.prompts[index // self.job.n]
                text = self.engine.tokenizer.decode(prompt, skip_special_tokens=False) + text
                if self.logprobs:  # None first (nothing predicts the first token), then a Token each
                    scored = self.job.seqs[index].prompt_logprobs or [None]
                    items = [(prompt[0], None), *((t.id, t) for t in scored[1:])]
        items += [(t.id, t) for t in tokens]
        logprobs = None
        if self.logprobs:
            logprobs = self.fmt.legacy(items, self.offset[index])
            self.offset[index] += sum(map(len, logprobs["tokens"]))
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


# ---------------------------------------------------------------------- app
def create_app(engine: Engine, model_name: str, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; the worker runs while the app does."""
    limits = limits or Limits()
    scheduler = Scheduler(engine, max_active=limits.max_active, max_queue=limits.max_queue)
    fmt = TokenText(engine.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="kinetic", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.scheduler, app.state.limits = engine, scheduler, limits
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    _add_error_handlers(app)
    _describe_errors(app)
    created = int(time.time())

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "kinetic",
                "max_model_len": engine.max_context}

    def submit(prompts: list[list[int]], params: list[SamplingParams], n: int) -> Job:
        job = Job(prompts, params, n, asyncio.get_running_loop())
        scheduler.submit(job)
        return job

    def meta(prefix: str, kind: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": model_name}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @app.get("/health", responses={503: {"description": "the worker thread is not running"}})
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "error", "message": "the worker thread is not running"}, 503)
        out = {"status": "ok", "model": model_name, **scheduler.stats()}
        if engine.speculative:  # MTP drafts so far: acceptance rate and tokens per model pass
            out["speculative"] = engine.spec_stats.as_dict()
        return out

    @app.get("/v1/models", responses=documented_responses(ModelList))
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", responses=documented_responses(ModelCard, 404))
    async def get_model(name: str):
        check_model(name)
        return model_card()

    generating = (400, 404, 413, 429, 500)

    @app.post("/v1/completions", responses=documented_responses(CompletionResponse, *generating, stream=True))
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = await run_in_threadpool(_prompt_ids, engine, req.prompt)
        k = req.logprobs
        params = _params(engine, limits, req, prompts, logprobs=k,
                         prompt_logprobs=k if req.echo and k is not None else None)
        job = submit(prompts, params, req.n or 1)
        render = _CompletionChoices(engine, fmt, job, bool(req.echo), k is not None)
        head = meta("cmpl", "text_completion")
        if req.stream:
            return _event_stream(_chunks(job, head, prompts, req.stream_options, render.choice))
        choices = await _collect(job, request)
        return {**head, "choices": [render.choice(i, c.text, c.tokens, c.finish_reason)
                                    for i, c in enumerate(choices)], "usage": _usage(prompts, job.seqs)}

    @app.post("/v1/chat/completions",
              responses=documented_responses(ChatCompletionResponse, *generating, stream=True))
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        messages = [m.model_dump() for m in req.messages]
        options = req.chat_template_kwargs or ChatTemplateKwargs()
        try:
            prompt = await run_in_threadpool(engine.encode_chat, messages, options.enable_thinking)
        except ValueError as err:  # the checkpoint's template refused the messages
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = _params(engine, limits, req, [prompt], extra_stop_ids=engine.chat_stop_token_ids, logprobs=k,
                         reasoning_budget=options.reasoning_budget)
        job = submit([prompt], params, req.n or 1)

        def logprobs(tokens: list[Token]) -> dict | None:
            return fmt.chat(tokens) if k is not None else None

        head = meta("chatcmpl", "chat.completion")
        if req.stream:
            head["object"] = "chat.completion.chunk"
            opening = tuple({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                            for i in range(job.size))  # OpenAI opens each choice with the role

            def chunk(i: int, text: str, tokens: list[Token], end: str | None, reasoning: str = "") -> dict:
                delta = {"reasoning_content": reasoning} if reasoning else {}
                return {"index": i, "delta": {**delta, "content": text} if text else delta,
                        "logprobs": logprobs(tokens), "finish_reason": end}

            return _event_stream(_chunks(job, head, [prompt], req.stream_options, chunk, opening,
                                         reasoning=engine.chat_template.is_reasoning))
        choices = await _collect(job, request)

        def message(c: _Choice) -> dict:
            out = {"role": "assistant", "content": c.text}
            return out if c.reasoning is None else {**out, "reasoning_content": c.reasoning}

        return {**head, "choices": [{"index": i, "message": message(c), "logprobs": logprobs(c.tokens),
                                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": _usage([prompt], job.seqs)}

    @app.post("/tokenize", responses=documented_responses(TokenizeResponse, 400, 404, 413))
    async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest):
        check_model(req.model)
        try:
            if isinstance(req, TokenizeChatRequest):
                messages = [m.model_dump() for m in req.messages]
                ids = await run_in_threadpool(engine.chat_template.encode, engine.tokenizer, messages,
                                              req.add_generation_prompt)
            else:
                ids = await run_in_threadpool(engine.encode, req.prompt)
        except ValueError as err:
            raise APIError(400, str(err), param="messages" if isinstance(req, TokenizeChatRequest)
                           else "prompt", code="invalid_value") from None
        strs = [fmt.text(i) for i in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", responses=documented_responses(DetokenizeResponse, 400, 404, 413))
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        size = min(engine.vocab_size, engine.tokenizer.get_vocab_size(with_added_tokens=True))
        bad = [t for t in req.tokens if t >= size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {size}); got {bad[:5]}", param="tokens",
                           code="invalid_value")
        return {"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    return app


def _describe_errors(app: FastAPI) -> None:
    """/openapi.json as the server answers: FastAPI lists 422 for validation errors, this server
    sends 400 (declared per route with OpenAI's error body)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible API of a kinetic checkpoint")
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        errors = err.errors()
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            detail = bad_json[0].get("ctx", {}).get("error", "")
            return APIError(400, f"the request body is not valid JSON: {detail}",
                            code="invalid_json").response()
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type:  # FastAPI only parses JSON bodies (curl -d sends a form)
            return APIError(400, f"send the body as JSON with Content-Type: application/json (got "
                            f"{content_type or 'no Content-Type'})", code="invalid_content_type").response()
        params = [_param(e.get("loc", ())) for e in errors]
        refused = [p.split(".")[0] for p in params if p and p.split(".")[0] in REFUSED]
        if refused:
            name = refused[0]
            return APIError(400, f"{name} is not supported by this server: {REFUSED[name]}; leave it out",
                            param=name, code="unsupported_parameter").response()
        where = [p or "body" for p in params]
        message = "; ".join(f"{w}: {e.get('msg')}" for w, e in zip(where[:3], errors, strict=False))
        return APIError(400, message or "invalid request", param=params[0] if params else None,
                        code="invalid_request").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        response = APIError(err.status_code, str(err.detail), code=codes.get(err.status_code)).response()
        response.headers.update(err.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()


def _param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content", "list[TextPart]", 0)`` -> ``"messages.0.content"``: the
    request field, without pydantic's union-member tags (type names such as ``constrained-str``, and
    the model names of a union body such as /tokenize's)."""
    parts = []
    for p in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(p, str) and ("[" in p or "-" in p or p in ("str", "int", "float", "bool", "none")):
            break
        if isinstance(p, str) and p[:1].isupper():
            continue
        parts.append(str(p))
    return ".".join(parts) or None


def _event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _chunks(job: Job, meta: dict, prompts: list[list[int]], options: StreamOptions | None,
                  choice: Callable[..., dict], opening: tuple[dict, ...] = (),
                  reasoning: bool = False) -> AsyncIterator[str]:
    """SSE lines: the ``opening`` chunks, a ``choice(index, text, tokens, finish_reason)`` chunk per
    delta that adds text or ends a choice (the tokens of steps that added no text come with the next
    chunk; with ``reasoning``, reasoning text counts too and goes to ``choice(..., reasoning=)``), the
    usage chunk if asked for, then [DONE]. An error after the response has started can
    only be reported in the stream, as an error event. Starlette cancels this generator when the
    client disconnects; ``finally`` then cancels the job."""
    waiting: list[list[Token]] = [[] for _ in range(job.size)]
    try:
        for chunk in opening:
            yield _sse(chunk)
        async for index, delta in job.deltas():
            waiting[index] += delta.tokens
            if delta.text or delta.finish_reason or (delta.reasoning and reasoning):
                extra = {"reasoning": delta.reasoning} if reasoning else {}
                piece = choice(index, delta.text, waiting[index], delta.finish_reason, **extra)
                yield _sse({**meta, "choices": [piece]})
                waiting[index] = []
        if options is not None and options.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(prompts, job.seqs)})
    except APIError as err:
        yield _sse(err.body())
    except Exception as err:
        yield _sse(APIError(500, f"generation failed: {err}", type="server_error").body())
    finally:
        job.cancel()
    yield _sse("[DONE]")


# ---------------------------------------------------------------------- running
def run(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
        limits: Limits | None = None, max_context: int | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None, log_level: str = "info", **engine_options) -> None:
    """Load ``checkpoint`` and serve it with uvicorn until interrupted; ``engine_options`` go to
    :class:`Engine` (speculative, draft_tokens, prefill_chunk, compile_decode, max_batch: by default
    ``limits.max_active``, so every admitted sequence decodes in one batch)."""
    import uvicorn

    limits = limits or Limits()
    engine_options.setdefault("max_batch", limits.max_active)
    engine = Engine.from_pretrained(checkpoint, device=device, dtype=dtype, max_context=max_context,
                                    **engine_options)
    name = model_name or Path(checkpoint).resolve().name
    print(f"kinetic serve: {checkpoint} as model {name!r}; API http://{host}:{port}/v1, chat page "
          f"http://{host}:{port}/", file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, name, limits), host=host, port=port, log_level=log_level)
