"""OpenAI-compatible HTTP server for an :class:`~kinetic.infer.engine.Engine` (FastAPI + uvicorn).

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions`` -- both with ``stream: true`` as server-sent events in OpenAI's chunk
format ending with ``data: [DONE]``, and usage counts -- ``GET /health``, and a chat page at ``/``.

Concurrency: the model and its caches are not thread-safe, so one worker thread (:class:`Scheduler`)
makes every model call. Requests are validated and tokenized off the worker, wait in a bounded queue
(full: 429), and are admitted into an active set that the worker advances round robin, one token per
sequence per pass -- continuous batching without a shared batch tensor (see the engine's docstring
for why): a new request starts while others are mid-generation, and nobody waits for the longest.
Deltas go back to the event loop through ``loop.call_soon_threadsafe``; a client that disconnects
mid-stream cancels its sequences.

Errors: client mistakes (malformed JSON, wrong types, unknown model, bad ``max_tokens``, a prompt
over the context limit, a body over the size limit) get a 4xx with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``; validation errors are 400, as in OpenAI's API.
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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from kinetic.infer.engine import Delta, Engine, GenerationSequence, SamplingParams

log = logging.getLogger("kinetic.serve")
STATIC = Path(__file__).parent / "static"
MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclass
class Limits:
    """What one request may ask for, and how much the server holds; each is a ``kinetic serve`` flag."""

    max_tokens: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # completion length when a request gives none (clipped to the context)
    max_n: int = 8  # choices per request (n x number of prompts)
    max_queue: int = 64  # requests waiting for the worker; more are answered 429
    max_active: int = 8  # sequences the worker advances in turn
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


# ---------------------------------------------------------------------- request schemas
class _Strict(BaseModel):
    # strict: "8" is not an int and "yes" is not a bool; unknown fields are ignored, as clients
    # send options this server does not implement (e.g. presence_penalty)
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 or -1 = off
    n: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False


# ---------------------------------------------------------------------- scheduler
class Job:
    """One request's sequences and the event-loop queue their deltas go to."""

    def __init__(self, seqs: list[GenerationSequence], loop: asyncio.AbstractEventLoop) -> None:
        self.seqs = seqs
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set when the client is gone; the worker then drops the sequences

    def push(self, index: int, item: Delta | BaseException) -> None:
        """Called on the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) until every sequence has finished; raises a worker error."""
        remaining = len(self.seqs)
        while remaining:
            index, item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finish_reason is not None
            yield index, item


class Scheduler:
    """The one thread that runs the model: admits queued jobs while fewer than ``max_active``
    sequences are active, then advances every active sequence by one token per pass."""

    def __init__(self, engine: Engine, max_active: int = 8, max_queue: int = 64) -> None:
        self.engine, self.max_active, self.max_queue = engine, max_active, max_queue
        self._pending: deque[Job] = deque()
        self._active: list[tuple[Job, int, GenerationSequence]] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.peak_active = 0  # most sequences ever active at once (tests check requests overlapped)

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
        return {"queued": len(self._pending), "active": len(self._active)}

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._pending) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self._pending)} requests are waiting "
                               "(kinetic serve --max-queue); retry later", type="rate_limit_error",
                               code="server_busy")
            self._pending.append(job)
            self._cv.notify()

    def _admit(self) -> None:
        with self._cv:
            while not self._active and not self._pending and not self._stopping:
                self._cv.wait()
            while self._pending and (not self._active
                                     or len(self._active) + len(self._pending[0].seqs) <= self.max_active):
                job = self._pending.popleft()
                if not job.cancelled:
                    self._active += [(job, i, s) for i, s in enumerate(job.seqs)]
            self.peak_active = max(self.peak_active, len(self._active))

    def _run(self) -> None:
        while True:
            self._admit()
            if self._stopping:
                for job in [*self._pending, *(a[0] for a in self._active)]:
                    job.push(0, RuntimeError("the server is shutting down"))
                return
            for job, index, seq in self._active:
                if job.cancelled:
                    continue
                try:
                    delta = self.engine.step(seq)
                except Exception as err:  # a bug or out of memory: fail this request, keep serving
                    log.exception("generation failed")
                    job.cancelled = True
                    job.push(index, err)
                    continue
                if delta.text or delta.finish_reason:
                    job.push(index, delta)
            self._active = [a for a in self._active if not a[0].cancelled and not a[2].finished]


# ---------------------------------------------------------------------- request -> sequences
def _max_tokens(asked: int | None, name: str, prompt_len: int, prompt_name: str, max_context: int,
                limits: Limits) -> int:
    """The completion length for a prompt: ``asked`` (the request's ``name`` field) checked against
    the server's limit and the context, or the default clipped to the room the prompt leaves."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty: give at least one token", param=prompt_name)
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


def _sequences(engine: Engine, limits: Limits, req: _Sampling, prompts: list[list[int]],
               extra_stop_ids: tuple[int, ...] = ()) -> list[GenerationSequence]:
    """The request's sequences: n per prompt, choice index = prompt index * n + j."""
    chat = isinstance(req, ChatCompletionRequest)
    if chat and req.max_completion_tokens is not None:
        max_tokens, name = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, name = req.max_tokens, "max_tokens"
    prompt_name = "messages" if chat else "prompt"
    n = req.n or 1
    if n * len(prompts) > limits.max_n:
        raise APIError(400, f"{n * len(prompts)} choices requested (n x prompts); this server's limit is "
                       f"{limits.max_n} (kinetic serve --max-n)", param="n", code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    top_k = req.top_k if req.top_k and req.top_k > 0 else 0
    seqs = []
    for ids in prompts:
        max_new = _max_tokens(max_tokens, name, len(ids), prompt_name, engine.max_context, limits)
        try:  # the schema already bounds every field; a ValueError here is still the client's
            base = SamplingParams(
                max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
                top_k=top_k, top_p=1.0 if req.top_p is None else req.top_p, stop_strings=tuple(stops),
                stop_token_ids=extra_stop_ids, ignore_eos=req.ignore_eos)
            for j in range(n):  # choice j gets seed + j: n copies of one seed would be n equal answers
                seed = None if req.seed is None else (req.seed + j) % 2**64
                seqs.append(engine.start(ids, replace(base, seed=seed)))
        except ValueError as err:
            raise APIError(400, str(err)) from None
    return seqs


def _prompt_ids(engine: Engine, prompt) -> list[list[int]]:
    """Completion prompts as token-id lists: a string, a list of strings, ids, or a list of id lists."""
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    try:
        return [engine.encode(p) for p in prompt]
    except ValueError as err:  # ids out of range, text that is not valid Unicode
        raise APIError(400, str(err), param="prompt") from None


def _usage(prompts: list[list[int]], seqs: list[GenerationSequence]) -> dict:
    prompt_tokens = sum(map(len, prompts))
    completion_tokens = sum(len(s.token_ids) for s in seqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# ---------------------------------------------------------------------- app
def create_app(engine: Engine, model_name: str, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; the worker runs while the app does."""
    limits = limits or Limits()
    scheduler = Scheduler(engine, max_active=limits.max_active, max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="kinetic", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.scheduler, app.state.limits = engine, scheduler, limits
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    _add_error_handlers(app)
    created = int(time.time())

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "kinetic",
                "max_model_len": engine.max_context}

    async def submit(seqs: list[GenerationSequence]) -> Job:
        job = Job(seqs, asyncio.get_running_loop())
        scheduler.submit(job)
        return job

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "error", "message": "the worker thread is not running"}, 503)
        out = {"status": "ok", "model": model_name, **scheduler.stats()}
        if engine.speculative:  # MTP drafts so far: acceptance rate and tokens per model pass
            out["speculative"] = engine.spec_stats.as_dict()
        return out

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        if req.echo or req.logprobs is not None:
            raise APIError(400, "echo and logprobs are not supported",
                           param="echo" if req.echo else "logprobs")
        prompts = await run_in_threadpool(_prompt_ids, engine, req.prompt)
        seqs = _sequences(engine, limits, req, prompts)
        job = await submit(seqs)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if req.stream:
            return _event_stream(_completion_chunks(job, meta, prompts, req.stream_options))
        texts, finish = await _collect(job)
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]}
                   for i in range(len(seqs))]
        return {**meta, "choices": choices, "usage": _usage(prompts, seqs)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        messages = [m.model_dump() for m in req.messages]
        try:
            prompt = await run_in_threadpool(engine.encode_chat, messages)
        except ValueError as err:  # the checkpoint's template refused the messages
            raise APIError(400, str(err), param="messages") from None
        seqs = _sequences(engine, limits, req, [prompt], engine.chat_stop_token_ids)
        job = await submit(seqs)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            return _event_stream(_chat_chunks(job, meta, [prompt], req.stream_options))
        texts, finish = await _collect(job)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": finish[i]} for i in range(len(seqs))]
        return {**meta, "choices": choices, "usage": _usage([prompt], seqs)}

    return app


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
        where = [".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body" for e in errors]
        message = "; ".join(f"{w}: {e.get('msg')}" for w, e in zip(where[:3], errors, strict=False))
        return APIError(400, message or "invalid request", param=_param(errors[0].get("loc", ())) if errors
                        else None, code="invalid_request").response()

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
    request field, without pydantic's union-member tags."""
    parts = []
    for p in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")):
            break
        parts.append(str(p))
    return ".".join(parts) or None


async def _collect(job: Job) -> tuple[list[str], list[str | None]]:
    texts: list[list[str]] = [[] for _ in job.seqs]
    finish: list[str | None] = [None] * len(job.seqs)
    try:
        async for index, delta in job.deltas():
            texts[index].append(delta.text)
            finish[index] = delta.finish_reason or finish[index]
    finally:
        job.cancelled = True  # a no-op when done; frees the worker when this request was abandoned
    return ["".join(t) for t in texts], finish


def _event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chunks(job: Job, meta: dict, prompts: list[list[int]], options: StreamOptions | None,
                  choice, opening: tuple[dict, ...] = ()) -> AsyncIterator[str]:
    """SSE lines: the ``opening`` chunks, a ``choice(index, delta)`` chunk per delta, the usage chunk
    if asked for, then [DONE]. An error after the response has started can only be reported in the
    stream, as an error event."""
    try:
        for chunk in opening:
            yield _sse(chunk)
        async for index, delta in job.deltas():
            yield _sse({**meta, "choices": [choice(index, delta)]})
        if options is not None and options.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(prompts, job.seqs)})
    except Exception as err:
        yield _sse(APIError(500, f"generation failed: {err}", type="server_error").body())
    finally:
        job.cancelled = True  # the client disconnected (or we are done): stop generating
    yield _sse("[DONE]")


def _completion_chunks(job: Job, meta: dict, prompts, options) -> AsyncIterator[str]:
    return _chunks(job, meta, prompts, options, lambda i, d: {
        "index": i, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason})


def _chat_chunks(job: Job, meta: dict, prompts, options) -> AsyncIterator[str]:
    meta = {**meta, "object": "chat.completion.chunk"}
    opening = tuple({**meta, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
                    for i in range(len(job.seqs)))  # OpenAI opens each choice with the role
    return _chunks(job, meta, prompts, options, lambda i, d: {
        "index": i, "delta": {"content": d.text} if d.text else {}, "logprobs": None,
        "finish_reason": d.finish_reason}, opening)


# ---------------------------------------------------------------------- running
def run(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
        limits: Limits | None = None, max_context: int | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None, log_level: str = "info", **engine_options) -> None:
    """Load ``checkpoint`` and serve it with uvicorn until interrupted; ``engine_options`` go to
    :class:`Engine` (speculative, draft_tokens, prefill_chunk, compile_decode)."""
    import uvicorn

    engine = Engine.from_pretrained(checkpoint, device=device, dtype=dtype, max_context=max_context,
                                    **engine_options)
    name = model_name or Path(checkpoint).resolve().name
    print(f"kinetic serve: {checkpoint} as model {name!r}; API http://{host}:{port}/v1, chat page "
          f"http://{host}:{port}/", file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, name, limits), host=host, port=port, log_level=log_level)
