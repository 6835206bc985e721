"""Verifiable environments for RL and evaluation. Each one generates its problems offline and
deterministically from a seed, and scores a completion with
``verify(prompt, completion, metadata) -> Reward(value, info)``.

    from kinetic.posttrain.envs import make
    env = make("arithmetic")
    train, held_out = env.problems(seed=0, n=1000), env.problems(seed=1, n=200)
    reward = env.verify(train[0].prompt, "4 + 5 = 9\\nAnswer: 9", train[0].metadata)

Built-in environments (``names()``):

- ``arithmetic``: multi-digit ``+``, ``-``, ``*``;
- ``word_problems``: templated multi-step problems in the GSM8K style;
- ``gsm8k``: GSM8K itself, ``make("gsm8k", path="../shared/data/gsm8k", split="test")``;
- ``strings``: reversal, sorting letters or words, counting a letter;
- ``instructions``: text under checkable rules, or JSON matching a schema;
- ``python``: a function checked by unit tests in the sandbox.

**The answer format** (every environment but ``instructions`` and ``python``): the final answer is
the value on the last line of the form ``Answer: <value>`` after the reasoning (after the last
``</think>``; nothing counts while a ``<think>`` is open). Any text may come before it. The word
``Answer`` may be in any case and wrapped in markdown (``**Answer:** 12``); the value may carry
surrounding ``**``, backticks or quotes and a final full stop. A numeric value must be one number
alone — ``-12``, ``1,234``, ``3.5``, ``$18`` — compared exactly; ``12 apples`` or ``12 or 13`` score 0.

**Problems** carry ``metadata["reference"]``, a completion that scores 1 (handy for SFT data and
tests). Problem ``index`` of a seed never changes: ``problems(seed, n)`` is a prefix of
``problems(seed, n + k)``.

**Your own environment** in a few lines: subclass :class:`Environment`, write ``generate(rng)``
(one problem from its own ``random.Random``) and ``verify``, and register it::

    import random
    from kinetic.posttrain.envs import Environment, Problem, Reward, make, register

    @register("capitals")
    class Capitals(Environment):
        PAIRS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi")]

        def generate(self, rng: random.Random) -> Problem:
            country, capital = rng.choice(self.PAIRS)
            return Problem(f"What is the capital of {country}?", {"answer": capital})

        def verify(self, prompt, completion, metadata) -> Reward:
            return Reward(float(metadata["answer"] in completion), {})

    env = make("capitals")
"""

from kinetic.posttrain.envs.arithmetic import Arithmetic
from kinetic.posttrain.envs.base import (
    ANSWER_INSTRUCTION,
    Environment,
    Problem,
    Reward,
    final_answer,
    make,
    names,
    parse_number,
    register,
    strip_reasoning,
    verify_number,
    verify_text,
)
from kinetic.posttrain.envs.code import PythonFunctions
from kinetic.posttrain.envs.instructions import InstructionFollowing, schema_errors
from kinetic.posttrain.envs.strings import StringTransforms
from kinetic.posttrain.envs.word_problems import GSM8K, WordProblems

__all__ = [
    "ANSWER_INSTRUCTION", "GSM8K", "Arithmetic", "Environment", "InstructionFollowing", "Problem",
    "PythonFunctions", "Reward", "StringTransforms", "WordProblems", "final_answer", "make", "names",
    "parse_number", "register", "schema_errors", "strip_reasoning", "verify_number", "verify_text",
]
