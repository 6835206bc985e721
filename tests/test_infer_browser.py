"""The chat page at ``/``, end to end in headless Chromium: a message typed into the page streams
back token by token and ends as the engine's greedy answer; a request the server refuses shows the
server's error message; the page then keeps working.

Needs Debian's ``chromium`` (or the binary named by ``KINETIC_CHROMIUM``) and the ``playwright``
Python package, which drives that binary (``playwright install`` is never needed). Without them the
test skips; with ``KINETIC_REQUIRE_BROWSER=1`` (set by ``.ci/run``) it fails instead, so CI cannot
pass by skipping it."""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import live_server

from kinetic import NemotronHForCausalLM, preset
from kinetic.data.tokenizer import train_tokenizer
from kinetic.infer import Engine, SamplingParams, create_app
from kinetic.infer.server import Limits

uvicorn = pytest.importorskip("uvicorn")


def _missing(reason: str) -> None:
    if os.environ.get("KINETIC_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (KINETIC_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import sync_playwright
except ImportError:
    _missing("the playwright package is not installed (pip install -e '.[test]')")
CHROMIUM = os.environ.get("KINETIC_CHROMIUM") or shutil.which("chromium")
if not CHROMIUM:
    _missing("no chromium binary (apt-get install chromium, or set KINETIC_CHROMIUM)")

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "def add(a, b):\n    return a + b\n" * 20]
MODEL = "tiny-browser"
CONTEXT = 128
MESSAGE = "Hi fox"
REPLY_TOKENS = 16

# Records every text the page shows in an assistant bubble: the page sets the bubble's textContent
# once per streamed chunk, and each set adds a new text node, so none is lost to observer batching.
WATCH = """() => {
  window.shown = [];
  new MutationObserver((records) => {
    for (const r of records)
      if (r.target.classList && r.target.classList.contains("assistant"))
        for (const n of r.addedNodes) if (n.nodeType === Node.TEXT_NODE) window.shown.push(n.data);
  }).observe(document.getElementById("log"), { childList: true, subtree: true });
}"""


@pytest.fixture(scope="module")
def served():
    """A live server on loopback and an engine on a copy of its model for the expected answers."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size()))
    ref = Engine(copy.deepcopy(model), tok, max_context=CONTEXT)
    app = create_app(Engine(model, tok, max_context=CONTEXT), MODEL, Limits(max_tokens=64))
    with live_server(app) as url:
        yield url, ref


@pytest.fixture(scope="module")
def page(served):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_chat_page_streams_and_shows_errors(served, page):
    url, ref = served
    page.set_default_timeout(20_000)
    page.goto(url)
    page.wait_for_function(f"document.getElementById('model').textContent === {MODEL!r}")
    page.evaluate(WATCH)

    # Refused: the message alone is over the context. The page shows the server's own message.
    page.fill("#input", "the quick brown fox " * CONTEXT)
    with page.expect_response(f"{url}/v1/chat/completions") as refused:
        page.press("#input", "Enter")
    status, body = refused.value.status, refused.value.json()
    assert 400 <= status < 500 and body["error"]["code"] == "context_length_exceeded", (status, body)
    assert "but the prompt has" in body["error"]["message"], body
    page.wait_for_selector(".msg.error")
    assert page.text_content(".msg.error") == "error: " + body["error"]["message"]
    assert page.locator(".msg.assistant").count() == 0  # the empty reply bubble is removed
    assert page.is_enabled("#send")

    # Streamed: typed, sent with Enter, greedy. The refused turn is not part of the conversation, so
    # the answer is the engine's greedy answer to this one message.
    want = ref.generate(
        [ref.encode_chat([{"role": "user", "content": MESSAGE}])],
        SamplingParams(max_new_tokens=REPLY_TOKENS, temperature=0, stop_token_ids=ref.chat_stop_token_ids),
    )[0]
    assert want.finish_reason == "length" and want.text, "pick a MESSAGE whose greedy reply is long"
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(REPLY_TOKENS))
    page.locator("#input").press_sequentially(MESSAGE)
    page.press("#input", "Enter")
    meta = page.wait_for_selector(".msg.assistant .meta")
    assert meta.text_content() == f"{want.usage.completion_tokens} tokens, finish: {want.finish_reason}"
    assert page.locator(".msg.user").last.text_content() == MESSAGE
    reply = page.evaluate("document.querySelector('.msg.assistant').firstChild.data")
    assert reply == want.text
    shown = page.evaluate("window.shown")
    assert len(set(shown)) >= 3, f"the reply did not arrive in pieces: {shown}"
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(shown, shown[1:], strict=False))
    assert shown[-1] == want.text
    assert page.is_enabled("#send") and page.is_disabled("#stop")
