"""OpenAI-compatible server, live on loopback: the official ``openai`` client (streaming and not)
gets the engine's answers; bad requests get a 4xx with an OpenAI error body and leave the server
healthy; 16 concurrent clients x 8 requests each get exactly their prompt's greedy answer."""

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
    "logprobs": (CHAT, {**OK_CHAT, "logprobs": True}, 400, "logprobs"),
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
    scheduler.submit(Job([], loop))
    with pytest.raises(APIError, match="busy"):
        scheduler.submit(Job([], loop))
    loop.close()


def test_client_that_leaves_mid_stream_cancels_its_sequence(served, monkeypatch):
    engine, steps = served.app.state.engine, []
    monkeypatch.setattr(engine, "step", lambda seq, step=engine.step: steps.append(1) or step(seq))
    body = {**OK_CHAT, "max_tokens": LIMITS.max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.url + CHAT, json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while httpx.get(f"{served.url}/health").json()["active"]:
        assert time.monotonic() < deadline, "the abandoned sequence kept running"
        time.sleep(0.02)
    assert len(steps) < LIMITS.max_tokens * 3 // 4  # stopped early, not run to max_tokens
    want = greedy(served.ref, user("after"), 4, chat=True)
    got = served.client.chat.completions.create(model=MODEL, messages=user("after"), max_tokens=4,
                                                temperature=0)
    assert got.choices[0].message.content == want.text


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
