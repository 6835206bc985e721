"""Fuzzing the server (#24): schemathesis generates requests from the server's own /openapi.json --
valid ones and, negated, invalid ones -- and sends them to a live server on a tiny model. Every
answer must be one the schema documents (status, content type, body), a request the schema rejects
must be refused with a 4xx, nothing may be a 5xx, and afterwards the server is healthy and gives
the right greedy answer. ``KINETIC_FUZZ_EXAMPLES`` sets the number of generated requests (the
default takes about half a minute on 2 cores; CI may raise it to fill about a minute)."""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from dataclasses import replace

import pytest
import torch
from conftest import live_server

from kinetic import NemotronHForCausalLM, preset
from kinetic.data.tokenizer import train_tokenizer
from kinetic.infer import Engine, SamplingParams, create_app
from kinetic.infer.server import Limits

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

EXAMPLES = int(os.environ.get("KINETIC_FUZZ_EXAMPLES", "150"))
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "def add(a, b):\n    return a + b\n" * 20]
MODEL = "tiny-fuzz"
CONTEXT = 64
LIMITS = Limits(max_tokens=4, default_max_tokens=4, max_n=2, max_queue=8, max_active=4,
                max_request_bytes=20_000)


@pytest.fixture(scope="module")
def served():
    """A live server, and an engine on a copy of its model for the expected answers."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size()))
    ref = Engine(copy.deepcopy(model), tok, max_context=CONTEXT)
    with live_server(create_app(Engine(model, tok, max_context=CONTEXT), MODEL, LIMITS)) as url:
        yield url, ref


# A request the schema accepts may still be refused for its values (a prompt over the context, a
# token id outside the vocabulary, max_tokens over the server's limit), as OpenAI's API does; those
# 400s carry these codes. Any other 400 to a schema-valid request means schema and server disagree.
REFUSED_FOR_VALUES = {"context_length_exceeded", "invalid_value"}


def test_fuzz_no_5xx_and_schema_agreement(served):
    url, ref = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE).map(lambda case: (True, case)),
                      schema.as_strategy(GenerationMode.NEGATIVE).map(lambda case: (False, case)))
    statuses: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(valid_case=cases)
    def fuzz(valid_case):
        valid, case = valid_case
        # schemathesis' own checks: no 5xx; status, content type and body as documented; requests
        # the schema rejects are refused with a 4xx. Its positive-data check wants a 2xx for every
        # schema-valid request; REFUSED_FOR_VALUES replaces it.
        response = case.call_and_validate(base_url=url, timeout=30,
                                          excluded_checks=[positive_data_acceptance])
        statuses[response.status_code] += 1
        if valid and response.status_code == 400:
            error = response.json()["error"]
            assert error["code"] in REFUSED_FOR_VALUES, (case.body, error)

    start = time.monotonic()
    fuzz()
    took = time.monotonic() - start
    print(f"fuzz: {sum(statuses.values())} requests in {took:.1f} s, by status "
          f"{dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= EXAMPLES // 2 and not [s for s in statuses if s >= 500]
    assert statuses[200] and statuses[400]  # both sides of the schema were exercised
    health = httpx.get(f"{url}/health").json()
    assert (health["status"], health["queued"], health["active"]) == ("ok", 0, 0)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "The quick", "max_tokens": 4, "temperature": 0})
    want = ref.generate(["The quick"], SamplingParams(max_new_tokens=4, temperature=0))[0].text
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
