"""OpenAI-compatible server, live on loopback: the official ``openai`` client (streaming and not)
gets the engine's answers, with echo, log-probs (checked against a plain forward of the model),
max_tokens 0, token-id prompts, stop lists, seeds and min_p; /tokenize and /detokenize; bad requests
and unsupported fields get a 4xx with an OpenAI error body and leave the server healthy; a client
that leaves, streaming or not, frees its slot within a second; an engine error fails only the
requests it hit; /openapi.json describes what the server answers; 16 concurrent clients x 8
requests each get exactly their prompt's greedy answer."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import live_server

from kinetic import NemotronHForCausalLM, preset
from kinetic.cli.infer import add_serve_args, cmd_serve
from kinetic.data.tokenizer import save_tokenizer, train_tokenizer
from kinetic.errors import UserError
from kinetic.infer import Engine, SamplingParams, create_app
from kinetic.infer.server import APIError, Job, Limits, Scheduler

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "def add(a, b):\n    return a + b\n" * 20,
         "héllo wörld, naïve café ünïcode 世界 🙂 " * 20]
MODEL = "tiny-test"
CONTEXT = 256
LIMITS = Limits(max_tokens=160, default_max_tokens=16, max_n=4, max_queue=64, max_active=8,
                max_request_bytes=20_000)


@pytest.fixture(scope="module")
def served():
    """A live server in a background thread; ``ref`` is an engine on a copy of the model, so
    expected answers can be computed while the server's worker runs."""
    tok = train_tokenizer(TEXTS, vocab_size=400)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size()))
    engine = Engine(model, tok, max_context=CONTEXT)
    ref = Engine(copy.deepcopy(model), tok, max_context=CONTEXT)
    app = create_app(engine, MODEL, LIMITS)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, ref=ref, client=client, app=app, tok=tok)


def greedy(ref: Engine, prompt, max_tokens: int, chat: bool = False, **params):
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0,
                            stop_token_ids=ref.chat_stop_token_ids if chat else (), **params)
    return ref.generate([ref.encode_chat(prompt) if chat else prompt], params)[0]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------- the openai client
def test_models_health_and_page(served):
    assert [m.id for m in served.client.models.list()] == [MODEL]
    assert served.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("gpt-9")
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    # the tiny model has an MTP layer, so the server decodes speculatively and reports how it goes
    served.client.completions.create(model=MODEL, prompt="The quick", max_tokens=6, temperature=0)
    spec = httpx.get(f"{served.url}/health").json()["speculative"]
    assert spec["rounds"] > 0 and spec["drafted"] >= spec["accepted"] >= 0
    page = httpx.get(f"{served.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "getReader" in page.text


def test_chat_completion(served):
    want = greedy(served.ref, user("Hi there"), 8, chat=True)
    got = served.client.chat.completions.create(model=MODEL, messages=user("Hi there"), max_tokens=8,
                                                temperature=0)
    assert got.object == "chat.completion" and got.model == MODEL
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        want.usage.prompt_tokens, want.usage.completion_tokens, want.usage.total_tokens)


def test_chat_completion_stream(served):
    want = greedy(served.ref, user("Stream me"), 10, chat=True)
    stream = served.client.chat.completions.create(model=MODEL, messages=user("Stream me"), max_tokens=10,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens


def test_completions_stream_and_not(served):
    want = greedy(served.ref, "The quick brown", 9)
    got = served.client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=9, temperature=0)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == want.usage.prompt_tokens
    stream = served.client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=9,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want.text


def test_completions_several_prompts_seeds_and_stop(served):
    got = served.client.completions.create(model=MODEL, prompt=["def add(", "The"], n=2, max_tokens=6,
                                           temperature=0.9, seed=7)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for i, (prompt, seed) in enumerate([("def add(", 7), ("def add(", 8), ("The", 7), ("The", 8)]):
        want = served.ref.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0.9, seed=seed))[0]
        assert got.choices[i].text == want.text
    assert got.usage.prompt_tokens == len(served.ref.encode("def add(")) + len(served.ref.encode("The"))
    full = greedy(served.ref, [5, 6, 7], 12).text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    got = served.client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=12, temperature=0,
                                           stop=[stop])
    assert got.choices[0].text == full[:full.index(stop)] and got.choices[0].finish_reason == "stop"


def test_openai_client_sees_openai_errors(served):
    with pytest.raises(openai.NotFoundError) as err:
        served.client.chat.completions.create(model="gpt-9", messages=user("x"))
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        served.client.completions.create(model=MODEL, prompt="word " * CONTEXT, max_tokens=4)
    assert err.value.code == "context_length_exceeded"


# ---------------------------------------------------------------------- echo, log-probs, tokenizer
def forward_logprobs(ref: Engine, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward of the model: the oracle."""
    with torch.inference_mode():
        logits = ref.model(torch.tensor([ids])).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_completions_echo_and_logprobs(served):
    """What lm-evaluation-harness sends: echo, logprobs, temperature 0. The prompt's log-probs equal
    a plain forward's; the generated tokens' equal the engine's; top_logprobs hold k alternatives and
    the chosen token; text offsets run over the token strings."""
    prompt = "The quick brown fox jumps"
    ids = served.ref.encode(prompt)
    k = 3
    got = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                           logprobs=k)
    want = served.ref.generate([prompt], SamplingParams(max_new_tokens=2, temperature=0, logprobs=k))[0]
    choice = got.choices[0]
    assert choice.text == prompt + want.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 2 and "".join(lp.tokens[:len(ids)]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    oracle = forward_logprobs(served.ref, ids).tolist()
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(oracle, abs=1e-4)
    assert lp.token_logprobs[len(ids):] == pytest.approx([t.logprob for t in want.tokens], abs=1e-5)
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert top[token] == logprob and len(top) <= k + 1  # fewer when two strings are equal ("\ufffd")
        assert max(top.values()) >= logprob
    # greedy: each generated token is its row's most likely one
    generated = range(len(ids), len(ids) + 2)
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in generated)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    # logprobs without echo: only the generated tokens
    got = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                           logprobs=0)
    assert got.choices[0].text == want.text and len(got.choices[0].logprobs.tokens) == 2
    assert all(len(top) == 1 for top in got.choices[0].logprobs.top_logprobs)


def test_completions_max_tokens_zero(served):
    """max_tokens 0: nothing generated; with echo and logprobs the prompt is scored (a batch of
    token-id prompts here), without logprobs the answer comes at once."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    r = httpx.post(served.url + COMPLETIONS, json={"prompt": prompts, "max_tokens": 0, "echo": True,
                                                   "logprobs": 1}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    for ids, choice in zip(prompts, body["choices"], strict=True):
        assert choice["finish_reason"] == "length"
        assert choice["text"] == served.tok.decode(ids, skip_special_tokens=False)
        logprobs = choice["logprobs"]["token_logprobs"]
        assert logprobs[0] is None and len(logprobs) == len(ids)
        assert logprobs[1:] == pytest.approx(forward_logprobs(served.ref, ids).tolist(), abs=1e-4)
    for echo in (False, True):
        r = httpx.post(served.url + COMPLETIONS, json={"prompt": "The quick", "max_tokens": 0, "echo": echo})
        choice = r.json()["choices"][0]
        assert r.status_code == 200 and choice["finish_reason"] == "length" and choice["logprobs"] is None
        assert choice["text"] == ("The quick" if echo else "")


def test_completions_min_p_and_tiny_temperature(served):
    """min_p=1 keeps only the most likely token, so sampling at temperature 1 gives the greedy text;
    #24 item 1: a temperature of 1e-45 is greedy (it was a 500)."""
    want = greedy(served.ref, "def add(", 8).text
    for body in ({"min_p": 1.0, "temperature": 1.0, "seed": 3}, {"temperature": 1e-45}):
        r = httpx.post(served.url + COMPLETIONS, json={"prompt": "def add(", "max_tokens": 8, **body})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (body, r.text)


def test_completions_stream_with_echo_and_logprobs(served):
    body = {"prompt": "The lazy dog", "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2}
    whole = httpx.post(served.url + COMPLETIONS, json=body).json()["choices"][0]
    with httpx.stream("POST", served.url + COMPLETIONS, json={**body, "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in choices) == whole["text"]
    for key in ("tokens", "token_logprobs", "text_offset", "top_logprobs"):
        assert [x for c in choices for x in c["logprobs"][key]] == whole["logprobs"][key], key


def test_chat_logprobs(served):
    want = served.ref.generate([served.ref.encode_chat(user("Hi there"))], SamplingParams(
        max_new_tokens=5, temperature=0, stop_token_ids=served.ref.chat_stop_token_ids, logprobs=2))[0]
    got = served.client.chat.completions.create(model=MODEL, messages=user("Hi there"), max_tokens=5,
                                                temperature=0, logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in want.tokens], abs=1e-5)
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == want.text
    for c, token in zip(content, want.tokens, strict=True):
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([lp for _, lp in token.top], abs=1e-5)
        assert all(t.token == bytes(t.bytes).decode(errors="replace") for t in c.top_logprobs)
    plain = served.client.chat.completions.create(model=MODEL, messages=user("Hi there"), max_tokens=5,
                                                  temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == want.text
    stream = served.client.chat.completions.create(model=MODEL, messages=user("Hi there"), max_tokens=5,
                                                   temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [c for chunk in stream for choice in chunk.choices if choice.logprobs
                for c in choice.logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]


def test_tokenize_and_detokenize(served):
    text = "héllo wörld 🙂 The quick"
    r = httpx.post(f"{served.url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == served.ref.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == CONTEXT
    assert len(body["token_strs"]) == body["count"]
    r = httpx.post(f"{served.url}/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    r = httpx.post(f"{served.url}/tokenize", json={"messages": user("hi")})
    assert r.json()["tokens"] == served.ref.encode_chat(user("hi")) and r.json()["token_strs"] is None
    r = httpx.post(f"{served.url}/tokenize", json={"messages": user("hi"), "add_generation_prompt": False})
    assert r.json()["tokens"] == served.ref.encode_chat(user("hi"))[:-1]  # no assistant opener


UNSUPPORTED = {  # field: (a value that would change the answer, its neutral value)
    "tools": ([{"type": "function", "function": {"name": "f"}}], []),
    "tool_choice": ("auto", "none"),
    "functions": ([{"name": "f"}], []),
    "function_call": ("auto", "none"),
    "response_format": ({"type": "json_object"}, {"type": "text"}),
    "logit_bias": ({"5": 10}, {}),
    "presence_penalty": (0.5, 0),
    "frequency_penalty": (-1, 0.0),
    "repetition_penalty": (1.2, 1),
    "guided_json": ({"type": "object"}, None),
    "suffix": ("x", ""),
    "best_of": (2, 1),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_fields_are_refused_by_name(served, name):
    """#24 item 3: a field that would change the answer is a 400 naming it, not silently ignored;
    its neutral value is accepted."""
    path = COMPLETIONS if name in ("suffix", "best_of") else CHAT
    base = {"prompt": "hi", "max_tokens": 2} if path == COMPLETIONS else OK_CHAT
    bad, neutral = UNSUPPORTED[name]
    r = httpx.post(served.url + path, json={**base, name: bad})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name and error["code"] == "unsupported_parameter" and name in error["message"]
    assert httpx.post(served.url + path, json={**base, name: neutral}).status_code == 200


def test_openapi_describes_the_server(served):
    """#24 item 3: 400 (not 422) for invalid requests, 404/413/429 where they apply, the event
    streams, prompt "" refused, and the unsupported fields limited to their neutral values."""
    schema = httpx.get(f"{served.url}/openapi.json").json()
    assert '"422"' not in json.dumps(schema) and "HTTPValidationError" not in json.dumps(schema)
    paths = schema["paths"]
    for path in (COMPLETIONS, CHAT):
        responses = paths[path]["post"]["responses"]
        assert {"200", "400", "404", "413", "429"} <= set(responses), path
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    for path in ("/tokenize", "/detokenize"):
        assert {"200", "400", "404", "413"} <= set(paths[path]["post"]["responses"]), path
    assert "404" in paths["/v1/models/{name}"]["get"]["responses"]
    components = schema["components"]["schemas"]
    prompt = components["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in prompt
    chat = components["ChatCompletionRequest"]["properties"]
    assert {"type": "array", "maxItems": 0, "items": {}} in chat["tools"]["anyOf"]
    assert chat["presence_penalty"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 0}
    assert components["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0] == {
        "type": "integer", "minimum": 0, "maximum": 20}


# ---------------------------------------------------------------------- bad requests
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_CHAT = {"model": MODEL, "messages": user("hello"), "max_tokens": 2}
BAD = {  # name: (path, body (dict = JSON, bytes = raw), status, error param or None)
    "malformed json": (CHAT, b'{"model": "tiny-test", "messages": [', 400, None),
    "empty body": (CHAT, b"", 400, None),
    "json array": (CHAT, b"[1, 2]", 400, None),
    "unknown model": (CHAT, {**OK_CHAT, "model": "gpt-9"}, 404, "model"),
    "negative max_tokens": (CHAT, {**OK_CHAT, "max_tokens": -1}, 400, "max_tokens"),
    "huge max_tokens": (CHAT, {**OK_CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
    "huge max_completion_tokens": (CHAT, {**OK_CHAT, "max_completion_tokens": 10**30}, 400,
                                   "max_completion_tokens"),
    "prompt over the context": (COMPLETIONS, {"prompt": "word " * CONTEXT}, 400, "prompt"),
    "chat over the context": (CHAT, {**OK_CHAT, "messages": user("word " * CONTEXT)}, 400, "messages"),
    "prompt + max_tokens over the context": (COMPLETIONS, {"prompt": [7] * 200, "max_tokens": 100}, 400,
                                             "max_tokens"),
    "max_tokens as a string": (CHAT, {**OK_CHAT, "max_tokens": "8"}, 400, "max_tokens"),
    "max_tokens as a bool": (CHAT, {**OK_CHAT, "max_tokens": True}, 400, "max_tokens"),
    "messages as a string": (CHAT, {**OK_CHAT, "messages": "hi"}, 400, "messages"),
    "message not an object": (CHAT, {**OK_CHAT, "messages": [1]}, 400, "messages.0"),
    "unknown role": (CHAT, {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400,
                     "messages.0.role"),
    "no messages": (CHAT, {**OK_CHAT, "messages": []}, 400, "messages"),
    "missing messages": (CHAT, {"model": MODEL}, 400, "messages"),
    "temperature as a string": (CHAT, {**OK_CHAT, "temperature": "hot"}, 400, "temperature"),
    "temperature out of range": (CHAT, {**OK_CHAT, "temperature": 5}, 400, "temperature"),
    "top_p zero": (CHAT, {**OK_CHAT, "top_p": 0}, 400, "top_p"),
    "stream as a string": (CHAT, {**OK_CHAT, "stream": "yes"}, 400, "stream"),
    "seed as a float": (CHAT, {**OK_CHAT, "seed": 1.5}, 400, "seed"),
    "too many choices": (CHAT, {**OK_CHAT, "n": 100}, 400, "n"),
    "too many stop strings": (CHAT, {**OK_CHAT, "stop": list("abcde")}, 400, "stop"),
    "empty stop string": (CHAT, {**OK_CHAT, "stop": [""]}, 400, "stop"),
    "top_logprobs over 20": (CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "logprobs over 20": (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    "logprobs as a bool": (COMPLETIONS, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    "negative max_tokens (completions)": (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    "min_p over 1": (COMPLETIONS, {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    "empty prompt in a list": (COMPLETIONS, {"prompt": ["a", ""]}, 400, "prompt"),
    "empty id list in a batch": (COMPLETIONS, {"prompt": [[1, 2], []]}, 400, "prompt"),
    "tokenize nothing": ("/tokenize", {"model": MODEL}, 400, None),
    "detokenize out of range": ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    "detokenize text": ("/detokenize", {"tokens": "hello"}, 400, "tokens"),
    "tokenize unknown model": ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    "token id out of range": (COMPLETIONS, {"prompt": [1, 10**6], "max_tokens": 2}, 400, "prompt"),
    "empty prompt list": (COMPLETIONS, {"prompt": [], "max_tokens": 2}, 400, "prompt"),
    "empty prompt": (COMPLETIONS, {"prompt": "", "max_tokens": 2}, 400, "prompt"),
    "prompt as a number": (COMPLETIONS, {"prompt": 5, "max_tokens": 2}, 400, "prompt"),
    "prompt list of mixed types": (COMPLETIONS, {"prompt": ["a", 1]}, 400, "prompt"),
    "image content part": (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content"),
    "lone surrogate": (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages"),
    "lone surrogate prompt": (COMPLETIONS, b'{"prompt": "a\\udfff"}', 400, "prompt"),
    "stop as a number": (CHAT, {**OK_CHAT, "stop": 5}, 400, "stop"),
    "body is a string": (CHAT, b'"hello"', 400, None),
    "body is null": (CHAT, b"null", 400, None),
    "not UTF-8": (CHAT, b"\xff\xfe", 400, None),
    "body too large": (CHAT, {**OK_CHAT, "messages": user("x" * 30_000)}, 413, None),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_an_openai_error(served, name):
    path, body, status, param = BAD[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(served.url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_unknown_routes_methods_and_chunked_bodies(served):
    r = httpx.get(f"{served.url}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(served.url + CHAT)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"

    def chunks(padding: int):  # no Content-Length: the limit is enforced while the body is read
        yield b" " * padding
        yield json.dumps(OK_CHAT).encode()

    r = httpx.post(served.url + CHAT, content=json.dumps(OK_CHAT), headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    headers = {"Content-Type": "application/json"}
    r = httpx.post(served.url + CHAT, content=chunks(LIMITS.max_request_bytes + 1), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(served.url + CHAT, content=chunks(10), headers=headers).status_code == 200


def test_full_queue_answers_429(served):
    app = create_app(served.ref, MODEL, replace(LIMITS, max_queue=0))
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        r = client.post(CHAT, json=OK_CHAT)
    assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
    scheduler = Scheduler(served.ref, max_active=1, max_queue=1)  # not started: jobs stay queued
    loop = asyncio.new_event_loop()
    scheduler.submit(Job([[5]], [SamplingParams()], 1, loop))
    with pytest.raises(APIError, match="busy"):
        scheduler.submit(Job([[5]], [SamplingParams()], 1, loop))
    loop.close()


def slow_steps(monkeypatch, engine, seconds: float) -> list[int]:
    """Make each engine step take ``seconds`` longer; returns a list that grows by one per step."""
    steps: list[int] = []

    def step(real=engine.step):
        steps.append(1)
        time.sleep(seconds)
        return real()

    monkeypatch.setattr(engine, "step", step)
    return steps


def wait_idle(url: str, within: float) -> float:
    """Seconds until /health reports no active sequence; fails after ``within`` seconds."""
    start = time.monotonic()
    while httpx.get(f"{url}/health").json()["active"]:
        assert time.monotonic() - start < within, f"a sequence was still active after {within} s"
        time.sleep(0.02)
    return time.monotonic() - start


def check_still_serving(served) -> None:
    want = greedy(served.ref, user("after"), 4, chat=True)
    got = served.client.chat.completions.create(model=MODEL, messages=user("after"), max_tokens=4,
                                                temperature=0)
    assert got.choices[0].message.content == want.text


def test_client_that_leaves_mid_stream_cancels_its_sequence(served, monkeypatch):
    steps = slow_steps(monkeypatch, served.app.state.engine, 0.03)
    body = {**OK_CHAT, "max_tokens": LIMITS.max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.url + CHAT, json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    wait_idle(served.url, within=1.0)
    # stopped early: the whole answer takes over 50 steps (at most 3 tokens each), some 2 s
    assert len(steps) < LIMITS.max_tokens // 4
    check_still_serving(served)


def test_client_that_leaves_a_whole_answer_cancels_its_sequence(served, monkeypatch):
    """#24 item 2: a non-streaming request whose client has gone is cancelled within a second (it
    used to decode to max_tokens). Steps are slowed so the answer would take over 50 steps, some 2 s."""
    steps = slow_steps(monkeypatch, served.app.state.engine, 0.03)
    body = json.dumps({**OK_CHAT, "max_tokens": LIMITS.max_tokens, "ignore_eos": True}).encode()
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while not httpx.get(f"{served.url}/health").json()["active"]:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    gone = wait_idle(served.url, within=1.0)  # the socket is closed: the client is gone
    assert len(steps) < LIMITS.max_tokens // 4, (gone, len(steps))
    check_still_serving(served)


@pytest.mark.parametrize("call", ["start", "step"])
def test_engine_error_fails_the_request_and_the_server_goes_on(served, monkeypatch, call):
    engine = served.app.state.engine

    def broken(*args):
        monkeypatch.undo()  # once
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(engine, call, broken)
    r = httpx.post(served.url + COMPLETIONS, json={"prompt": "The quick", "max_tokens": 4}, timeout=30)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error" and "simulated" in r.json()["error"]["message"]
    assert httpx.get(f"{served.url}/health").json() | {"speculative": None} == {
        "status": "ok", "model": MODEL, "queued": 0, "active": 0, "speculative": None}
    check_still_serving(served)


# ---------------------------------------------------------------------- concurrency
def test_sixteen_clients_times_eight_requests(served):
    prompts = ["The quick", "def add(a", "héllo", "over the lazy", "return a", "fox", "naïve café", "b):"]
    max_tokens = 4
    want_completion = {p: greedy(served.ref, p, max_tokens).text for p in prompts}
    want_chat = {p: greedy(served.ref, user(p), max_tokens, chat=True).text for p in prompts}

    def client_run(t: int) -> list[str]:
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=120)
        wrong = []
        for r in range(8):
            prompt, stream, chat = prompts[(t + r) % len(prompts)], r % 2 == 1, (t + r) % 4 < 2
            common = dict(model=MODEL, max_tokens=max_tokens, temperature=0, stream=stream)
            if chat:
                out = client.chat.completions.create(messages=user(prompt), **common)
                text = "".join(c.choices[0].delta.content or "" for c in out) if stream \
                    else out.choices[0].message.content
                want = want_chat[prompt]
            else:
                out = client.completions.create(prompt=prompt, **common)
                text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
                want = want_completion[prompt]
            if text != want:
                wrong.append(f"client {t} request {r} ({prompt!r}, chat={chat}, stream={stream}): "
                             f"{text!r} != {want!r}")
        return wrong

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client_run, range(16)))
    wrong = [w for ws in results for w in ws]
    assert len(results) == 16 and not wrong, "\n".join(wrong[:5])
    assert served.app.state.scheduler.peak_active > 1  # the requests really overlapped
    health = httpx.get(f"{served.url}/health").json()
    assert {k: health[k] for k in ("status", "model", "queued", "active")} == {
        "status": "ok", "model": MODEL, "queued": 0, "active": 0}


# ---------------------------------------------------------------------- the command
def test_cmd_serve_runs_a_server_until_interrupted(served, tmp_path):
    served.ref.model.save_pretrained(tmp_path / "ckpt")
    save_tokenizer(served.tok, tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import argparse, sys; from kinetic.cli.infer import add_serve_args, cmd_serve; "
            "p = argparse.ArgumentParser(); add_serve_args(p); sys.exit(cmd_serve(p.parse_args()))")
    proc = subprocess.Popen([sys.executable, "-c", code, "--checkpoint", str(tmp_path / "ckpt"), "--port",
                             str(port), "--log-level", "warning", "--no-speculative", "--draft-tokens", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "kinetic serve did not start"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert models["data"][0]["id"] == "ckpt"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert f"http://127.0.0.1:{port}/v1" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    args = SimpleNamespace(max_tokens=0, default_max_tokens=1, max_n=1, max_queue=1, max_active=1,
                           max_request_bytes=1)
    with pytest.raises(UserError, match="--max-tokens=0"):
        cmd_serve(args)
    # a device the server cannot have is refused before the checkpoint is read
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    with pytest.raises(UserError, match=r"--device gpu is invalid"):
        cmd_serve(parser.parse_args(["--checkpoint", str(tmp_path / "nowhere"), "--device", "gpu"]))
    assert parser.parse_args(["--checkpoint", "x", "--dtype", "bfloat16"]).dtype == "bfloat16"
