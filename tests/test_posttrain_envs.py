"""Verifiable environments: problems are a pure function of (seed, index), also across processes;
every verifier accepts its reference answer and rejects wrong ones (table-driven); the answer
format parses strictly; the JSON-schema subset; registering a custom environment as the package
docstring shows; GSM8K from ../shared/data/gsm8k when it is there."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

import kinetic.posttrain.envs as envs
from kinetic.posttrain.envs import Reward, final_answer, make, parse_number, schema_errors
from kinetic.posttrain.sandbox import Limits, Sandbox, SandboxError

GSM8K_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"
BUILTIN = ["arithmetic", "word_problems", "strings", "instructions", "python"]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(wall_s=2.0, cpu_s=1, memory_mb=256, processes=8), workers=2)


def env_for(name, sandbox=None):
    return make(name, sandbox=sandbox) if name == "python" else make(name)


@pytest.mark.parametrize("name", BUILTIN)
def test_problems_are_a_function_of_the_seed(name):
    env = env_for(name)
    assert env.problems(0, 6) == env_for(name).problems(0, 6)  # a fresh instance, the same problems
    assert env.problems(0, 6)[2:] == env.problems(0, 4, start=2)  # index i is always the same problem
    train, held_out = {str(p) for p in env.problems(0, 30)}, {str(p) for p in env.problems(1, 30)}
    assert len(train) > 20 and len(train & held_out) < 5  # seeds give different problem sets


def _digest(hash_seed: str) -> str:
    code = ("import hashlib, json; from kinetic.posttrain.envs import make\n"
            f"ps = [p for n in {BUILTIN!r} for p in make(n).problems(3, 5)]\n"
            "print(hashlib.sha256(json.dumps([[p.prompt, p.metadata] for p in ps]).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def test_problems_do_not_depend_on_the_process():
    here = [p for n in BUILTIN for p in make(n).problems(3, 5)]
    digest = hashlib.sha256(json.dumps([[p.prompt, p.metadata] for p in here]).encode()).hexdigest()
    assert _digest("1") == digest


@pytest.mark.parametrize("name", BUILTIN)
def test_reference_answers_score_one(name, sandbox):
    env = env_for(name, sandbox)
    problems = env.problems(7, 8 if name == "python" else 40)
    rewards = env.verify_many([p.prompt for p in problems], [p.metadata["reference"] for p in problems],
                              [p.metadata for p in problems])
    assert [r.value for r in rewards] == [1.0] * len(problems), [r.info for r in rewards if r.value != 1]


def _bump(meta):
    return f"Answer: {Fraction(meta['answer']) + 1}"


# (environment, what the wrong completion does, how to make it from the metadata, a word in info)
WRONG = [
    ("arithmetic", "off by one", _bump, "wrong answer"),
    ("arithmetic", "no answer line", lambda m: m["answer"], "no 'Answer:'"),
    ("arithmetic", "two numbers", lambda m: f"Answer: {m['answer']} or 1", "not a single number"),
    ("arithmetic", "a unit after the number", lambda m: f"Answer: {m['answer']} km", "not a single number"),
    ("arithmetic", "reasoning never closed", lambda m: f"<think>Answer: {m['answer']}", "no 'Answer:'"),
    ("arithmetic", "answer only inside the reasoning",
     lambda m: f"<think>Answer: {m['answer']}</think>I am not sure.", "no 'Answer:'"),
    ("arithmetic", "the last answer line counts", lambda m: f"Answer: {m['answer']}\n{_bump(m)}", "wrong"),
    ("word_problems", "off by one", _bump, "wrong answer"),
    ("word_problems", "GSM8K's #### marker", lambda m: f"#### {m['answer']}", "no 'Answer:'"),
    ("strings", "a wrong string or count",
     lambda m: _bump(m) if m["answer"].isdigit() else f"Answer: {m['answer']}x", "wrong answer"),
    ("strings", "the case changed", lambda m: f"Answer: {m['answer'].upper()}", "wrong answer"),
]


@pytest.mark.parametrize(("name", "case", "wrong", "why"), WRONG, ids=[f"{w[0]}: {w[1]}" for w in WRONG])
def test_wrong_answers_score_zero(name, case, wrong, why):
    env = make(name)
    for problem in env.problems(11, 20):
        if name == "strings" and case == "the case changed" and problem.metadata["task"] == "count_letter":
            continue
        reward = env.verify(problem.prompt, wrong(problem.metadata), problem.metadata)
        assert reward.value == 0.0 and why in reward.info.get("reason", ""), (problem.prompt, reward)


def test_decorated_answers_still_count():
    env = make("arithmetic")
    problem = env.problems(5, 1)[0]
    answer = problem.metadata["answer"]
    for completion in [f"Let me think.\n**Answer:** {answer}.", f"<think>hmm</think>\nanswer: `{answer}`",
                       f"Answer: {int(answer):,}", f"> ANSWER: **{answer}**\n"]:
        assert env.verify(problem.prompt, completion, problem.metadata).value == 1.0, completion


@pytest.mark.parametrize(("text", "value"), [
    ("Answer: 42", "42"), ("work...\nAnswer: 1\nAnswer: 2", "2"), ("**Answer**: 7", "7"),
    ("Answer: 'olleh'", "olleh"), ("no answer here", None), ("<think>Answer: 3", None),
    ("<think>x</think>Answer: 3", "3"), ("The Answer: 5 is inline", None),
])
def test_final_answer(text, value):
    assert final_answer(text) == value


@pytest.mark.parametrize(("text", "value"), [
    ("42", Fraction(42)), ("-7", Fraction(-7)), ("1,234", Fraction(1234)), ("$18", Fraction(18)),
    ("3.50", Fraction(7, 2)), ("12 apples", None), ("1,23", None), ("1e3", None), ("", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


# ---- instruction following ---------------------------------------------------------------------------

def _text_problem(kind):
    env = make("instructions", json_fraction=0.0)
    return next(p for p in env.problems(0, 200)
                if any(c["kind"] == kind for c in p.metadata["constraints"]))


BREAK_RULE = {  # each turns the reference into a reply that breaks exactly that rule
    "word_range": lambda ref, c: ref + " word" * (c["max"] + 1),
    "bullets": lambda ref, c: ref + "\n- one more",
    "include": lambda ref, c: re.sub(rf"\b{c['keyword']}\b", "thing", ref),
    "lowercase": lambda ref, c: ref.replace(ref.split()[1], ref.split()[1].upper(), 1),
    "end_with": lambda ref, c: ref + " really",
    "no_commas": lambda ref, c: ref.replace(" ", ", ", 1),
}


@pytest.mark.parametrize("kind", sorted(BREAK_RULE))
def test_instruction_rules_are_checked(kind):
    problem = _text_problem(kind)
    env = make("instructions", json_fraction=0.0)
    rule = next(c for c in problem.metadata["constraints"] if c["kind"] == kind)
    broken = BREAK_RULE[kind](problem.metadata["reference"], rule)
    reward = env.verify(problem.prompt, broken, problem.metadata)
    assert reward.value == 0.0 and kind in reward.info["failed"]
    partial = make("instructions", json_fraction=0.0, partial=True)
    total = len(problem.metadata["constraints"])
    assert partial.verify(problem.prompt, broken, problem.metadata).value <= (total - 1) / total


def test_json_replies():
    env = make("instructions", json_fraction=1.0)
    problem = env.problems(0, 1)[0]
    reference, schema = json.loads(problem.metadata["reference"]), problem.metadata["schema"]
    key = schema["required"][0]
    fenced = f"<think>plan</think>Here it is:\n```json\n{json.dumps(reference)}\n```"
    assert env.verify(problem.prompt, fenced, problem.metadata).value == 1.0
    for wrong, why in [({k: v for k, v in reference.items() if k != key}, "missing"),
                       ({**reference, "extra": 1}, "unexpected property"),
                       ({**reference, key: None}, "expected")]:
        reward = env.verify(problem.prompt, json.dumps(wrong), problem.metadata)
        assert reward.value == 0.0 and any(why in e for e in reward.info["errors"]), reward
    assert "not JSON" in env.verify(problem.prompt, "{'a': 1}", problem.metadata).info["reason"]


SCHEMA = {"type": "object", "required": ["n", "tags"], "additionalProperties": False,
          "properties": {"n": {"type": "integer", "minimum": 1, "exclusiveMaximum": 10},
                         "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]},
                                  "minItems": 1, "maxItems": 2, "uniqueItems": True},
                         "note": {"type": ["string", "null"], "maxLength": 3, "pattern": "^x"}}}


@pytest.mark.parametrize(("value", "errors"), [
    ({"n": 3, "tags": ["a"]}, 0), ({"n": 3.0, "tags": ["a", "b"], "note": None}, 0),
    ({"n": 3, "tags": ["a"], "note": "xy"}, 0),
    ({"n": True, "tags": ["a"]}, 1), ({"n": 10, "tags": ["a"]}, 1), ({"n": 0, "tags": []}, 2),
    ({"n": 2, "tags": ["a", "a"]}, 1), ({"n": 2, "tags": ["c"]}, 1), ({"tags": ["a"], "x": 1}, 2),
    ({"n": 2, "tags": ["a"], "note": "yyyy"}, 2), ([1], 1),
])
def test_schema_errors(value, errors):
    assert len(schema_errors(value, SCHEMA)) == errors, schema_errors(value, SCHEMA)


def test_schema_keywords_outside_the_subset_are_refused():
    with pytest.raises(ValueError, match="oneOf"):
        schema_errors(1, {"oneOf": [{"type": "integer"}]})


# ---- Python functions in the sandbox ------------------------------------------------------------------

CODE_WRONG = [  # (the reply, a word of the reason)
    ("```python\ndef nothing():\n    pass\n```", "exit status 1"),
    ("```python\ndef broken(:\n```", "exit status 1"),
    ("```python\nwhile True:\n    pass\n```", "SIGXCPU"),
    ("```python\nimport sys\nsys.exit(0)\n```", "before the tests finished"),
    ("<think>```python\nprint(1)\n```", "reasoning never ended"),
]


@pytest.mark.parametrize(("reply", "why"), CODE_WRONG, ids=[w[1] for w in CODE_WRONG])
def test_wrong_programs_score_zero(reply, why, sandbox):
    env = make("python", sandbox=sandbox)
    problem = env.problems(2, 1)[0]
    reward = env.verify(problem.prompt, reply, problem.metadata)
    assert reward.value == 0.0 and why in reward.info["reason"], reward.info


def test_a_subtly_wrong_program_fails_its_tests(sandbox):
    env = make("python", sandbox=sandbox)
    for problem in env.problems(4, 3):
        # The reference with its first constant changed (or its last statement dropped).
        code = problem.metadata["reference"]
        wrong = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), code, count=1)
        wrong = wrong if wrong != code else code.replace("return", "return None and", 1)
        reward = env.verify(problem.prompt, wrong, problem.metadata)
        assert reward.value == 0.0, (problem.metadata["task"], wrong)


def test_a_sandbox_failure_raises_instead_of_scoring(sandbox, monkeypatch):
    env = make("python", sandbox=sandbox)
    problem = env.problems(0, 1)[0]

    def broken(*args, **kwargs):
        raise SandboxError("worker died")

    monkeypatch.setattr(sandbox, "run", broken)
    with pytest.raises(SandboxError):
        env.verify(problem.prompt, problem.metadata["reference"], problem.metadata)


# ---- registry ------------------------------------------------------------------------------------------

def test_custom_environment_as_the_docstring_shows():
    example = envs.__doc__.split("register it::", 1)[1]
    namespace: dict = {}
    exec(textwrap.dedent(example), namespace)
    env = namespace["env"]
    assert "capitals" in envs.names() and env.name == "capitals"
    problems = env.problems(0, 5)
    assert problems == make("capitals").problems(0, 5)
    for p in problems:
        assert env.verify(p.prompt, f"It is {p.metadata['answer']}.", p.metadata) == Reward(1.0, {})
        assert env.verify(p.prompt, "No idea.", p.metadata).value == 0.0
    assert problems[0].messages == [{"role": "user", "content": problems[0].prompt}]


def test_registry_errors():
    with pytest.raises(ValueError, match="arithmetic"):
        make("no-such-env")
    with pytest.raises(ValueError, match="registered already"):
        envs.register("arithmetic")(envs.Arithmetic)
    with pytest.raises(ValueError, match="max_digits"):
        make("arithmetic", min_digits=3, max_digits=2)


# ---- GSM8K ---------------------------------------------------------------------------------------------

needs_gsm8k = pytest.mark.skipif(not (GSM8K_DIR / "test.jsonl").is_file(),
                                 reason=f"GSM8K not found at {GSM8K_DIR}")


@needs_gsm8k
def test_gsm8k_loads_and_verifies_like_the_word_problems():
    env = make("gsm8k", path=GSM8K_DIR, split="test")
    assert len(env) == 1319
    problems = env.problems(0, 20)
    assert problems == make("gsm8k", path=GSM8K_DIR).problems(0, 20)
    assert problems != env.problems(1, 20)
    for p in problems:
        assert "<<" not in p.metadata["reference"] and "####" not in p.metadata["reference"]
        assert env.verify(p.prompt, p.metadata["reference"], p.metadata).value == 1.0
        assert env.verify(p.prompt, _bump(p.metadata), p.metadata).value == 0.0
    assert type(env).verify is envs.WordProblems.verify


def test_gsm8k_missing_path_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass path="):
        make("gsm8k", path=tmp_path)
