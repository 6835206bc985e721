"""The environment interface (``Problem``, ``Reward``, ``Environment``), the registry, and the
parsing of final answers that every built-in environment shares."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any


@dataclass(frozen=True)
class Problem:
    prompt: str | list[dict]  # a user message, or chat messages ({"role", "content"} dicts)
    metadata: dict[str, Any] = field(default_factory=dict)  # what verify needs; JSON-serialisable

    @property
    def messages(self) -> list[dict]:
        """The prompt as chat messages."""
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else self.prompt


@dataclass(frozen=True)
class Reward:
    value: float
    info: dict[str, Any] = field(default_factory=dict)  # why: the parsed answer, the reason it failed, ...


class Environment:
    """A verifiable task. Subclasses write ``generate(rng)`` (one problem from its own random
    generator) and ``verify``; problem ``index`` of ``seed`` is then the same on every call and
    every machine, and different seeds give independent problem sets (train on seed 0, hold out
    seed 1). Built-in problems carry ``metadata["reference"]``, a completion that scores 1."""

    name: str = "environment"  # set by @register

    def generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError(f"{type(self).__name__} must define generate(rng) or problem(seed, index)")

    def verify(self, prompt: str | list[dict], completion: str, metadata: dict) -> Reward:
        raise NotImplementedError

    def problem(self, seed: int, index: int) -> Problem:
        return self.generate(random.Random(f"{self.name}:{seed}:{index}"))

    def problems(self, seed: int, n: int, start: int = 0) -> list[Problem]:
        return [self.problem(seed, i) for i in range(start, start + n)]

    def verify_many(self, prompts: list, completions: list[str], metadatas: list[dict]) -> list[Reward]:
        """Score a batch (environments with slow verifiers run it concurrently)."""
        return [self.verify(p, c, m) for p, c, m in zip(prompts, completions, metadatas, strict=True)]


# ---- registry --------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Environment]] = {}


def register(name: str) -> Callable:
    """Class decorator (or a plain call on a factory) that makes ``make(name, **kwargs)`` build it."""

    def add(factory: Callable[..., Environment]) -> Callable[..., Environment]:
        if name in _REGISTRY:
            raise ValueError(f"environment {name!r} is registered already; pick another name")
        if isinstance(factory, type):
            factory.name = name
        _REGISTRY[name] = factory
        return factory

    return add


def make(name: str, **kwargs) -> Environment:
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment {name!r}; registered: {', '.join(names())}")
    env = _REGISTRY[name](**kwargs)
    env.name = name
    return env


def names() -> list[str]:
    return sorted(_REGISTRY)


# ---- final answers ---------------------------------------------------------------------------------

ANSWER_INSTRUCTION = "End your response with a final line of the form 'Answer: <answer>'."
_ANSWER_LINE = re.compile(r"^[ \t>*_#]*answer[ \t]*\**[ \t]*:[ \t]*(.*?)[ \t]*$",
                          re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def strip_reasoning(completion: str) -> str | None:
    """The text after the reasoning: after the last ``</think>``; None while a ``<think>`` is open."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    return None if "<think>" in completion else completion


def final_answer(completion: str) -> str | None:
    """The value of the last ``Answer: ...`` line after the reasoning, without decoration: surrounding
    ``**``, backticks, quotes and a final full stop. Text before that line is ignored; text after it
    does not matter either (the last such line wins)."""
    text = strip_reasoning(completion)
    matches = _ANSWER_LINE.findall(text or "")
    if not matches:
        return None
    value = matches[-1].strip().removesuffix(".").strip("*").strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "`'\"":
        value = value[1:-1]
    return value


def parse_number(value: str | None) -> Fraction | None:
    """A number written alone (``-12``, ``1,234``, ``$5``, ``3.50``); None for anything else."""
    if value is None:
        return None
    value = value.strip().removeprefix("$").strip()
    if not _NUMBER.fullmatch(value):
        return None
    return Fraction(value.replace(",", ""))


def verify_number(completion: str, expected: str) -> Reward:
    """Reward 1 when the final answer is the expected number (compared exactly, as fractions)."""
    answer = final_answer(completion)
    if answer is None:
        return no_answer()
    number = parse_number(answer)
    if number is None:
        return Reward(0.0, {"reason": "the answer is not a single number", "answer": answer})
    return _graded(answer, expected, number == Fraction(expected))


def verify_text(completion: str, expected: str) -> Reward:
    """Reward 1 when the final answer is exactly ``expected`` (case included)."""
    answer = final_answer(completion)
    return no_answer() if answer is None else _graded(answer, expected, answer == expected)


def no_answer() -> Reward:
    return Reward(0.0, {"reason": "no 'Answer:' line after the reasoning"})


def _graded(answer: str, expected: str, correct: bool) -> Reward:
    return Reward(float(correct), {"answer": answer, "expected": expected,
                                   **({} if correct else {"reason": "wrong answer"})})
