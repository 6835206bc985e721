"""Python functions checked by unit tests in the sandbox (:mod:`kinetic.posttrain.sandbox`). A
problem asks for one function; its tests are asserts on inputs drawn from the seed, with expected
values computed by a reference solution. The program is the last fenced code block of the reply
(```python or bare ```), or the whole reply when it has none.

Reward 1 when every assert passes, 0 when the program fails, times out or breaks a limit (the
sandbox's reason in ``info``). A failure of the sandbox itself raises
:class:`~kinetic.posttrain.sandbox.SandboxError`: it is no verdict on the program."""

from __future__ import annotations

import random
import re
import string
from concurrent.futures import ThreadPoolExecutor

from kinetic.posttrain.envs.base import Environment, Problem, Reward, register, strip_reasoning
from kinetic.posttrain.sandbox import Limits, Sandbox, run_tests


def _ints(rng, lo=-20, hi=20, n=(0, 8)):
    return [rng.randint(lo, hi) for _ in range(rng.randint(*n))]


def _word(rng):
    return "".join(rng.choice("abcAB c") for _ in range(rng.randint(0, 10)))


# Each task: (function name, description with {params}, reference source with {params}, params, inputs).
TASKS = {
    "scale": ("scale", "returns a new list with every element of the list `xs` multiplied by {k}",
              "def scale(xs):\n    return [x * {k} for x in xs]\n",
              lambda r: {"k": r.randint(2, 9)}, lambda r: (_ints(r),)),
    "count_char": ("count_char", "returns how many times the letter '{c}' occurs in the string `s`, "
                   "ignoring case",
                   "def count_char(s):\n    return s.lower().count('{c}')\n",
                   lambda r: {"c": r.choice("abc")}, lambda r: (_word(r),)),
    "sum_multiples": ("sum_multiples", "returns the sum of the positive integers below `n` that are "
                      "multiples of {a} or {b}",
                      "def sum_multiples(n):\n"
                      "    return sum(i for i in range(1, n) if i % {a} == 0 or i % {b} == 0)\n",
                      lambda r: dict(zip("ab", r.sample(range(2, 8), 2), strict=True)),
                      lambda r: (r.randint(0, 60),)),
    "rotate": ("rotate", "returns the list `xs` rotated left by {k} positions (an empty list stays empty)",
               "def rotate(xs):\n    if not xs:\n        return []\n"
               "    k = {k} % len(xs)\n    return xs[k:] + xs[:k]\n",
               lambda r: {"k": r.randint(1, 6)}, lambda r: (_ints(r),)),
    "running_max": ("running_max", "returns the list whose i-th element is the largest of `xs[0..i]`",
                    "def running_max(xs):\n    out = []\n    for x in xs:\n"
                    "        out.append(x if not out else max(out[-1], x))\n    return out\n",
                    lambda r: {}, lambda r: (_ints(r),)),
    "palindrome": ("is_palindrome", "returns True when the string `s` reads the same backwards, "
                   "ignoring case and every character that is not a letter or digit",
                   "def is_palindrome(s):\n"
                   "    t = [ch.lower() for ch in s if ch.isalnum()]\n    return t == t[::-1]\n",
                   lambda r: {}, lambda r: (r.choice([_word(r), "Abc, cba", "No lemon, no melon"]),)),
    "fib_mod": ("fib_mod", "returns the `n`-th Fibonacci number (fib(0) = 0, fib(1) = 1) modulo {m}",
                "def fib_mod(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, (a + b) % {m}\n"
                "    return a % {m}\n",
                lambda r: {"m": r.randint(7, 1000)}, lambda r: (r.randint(0, 200),)),
    "caesar": ("caesar", "returns the lowercase string `s` with every letter shifted {k} places forward "
               "in the alphabet (wrapping from z to a); other characters are unchanged",
               "def caesar(s):\n"
               "    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if c.isalpha() else c for c in s)\n",
               lambda r: {"k": r.randint(1, 25)},
               lambda r: ("".join(r.choice(string.ascii_lowercase + " ") for _ in range(r.randint(0, 12))),)),
}


def extract_code(reply: str) -> str:
    blocks = re.findall(r"```[a-zA-Z0-9]*[ \t]*\n(.*?)```", reply, re.DOTALL)
    return blocks[-1] if blocks else reply


@register("python")
class PythonFunctions(Environment):
    """``sandbox`` defaults to one with ``limits`` and ``workers``, made on first use."""

    def __init__(self, sandbox: Sandbox | None = None, limits: Limits | None = None, workers: int = 2,
                 n_tests: int = 6):
        self._sandbox, self._limits, self._workers, self.n_tests = sandbox, limits, workers, n_tests

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(self._limits or Limits(wall_s=10, cpu_s=5), self._workers)
        return self._sandbox

    def generate(self, rng: random.Random) -> Problem:
        task = rng.choice(sorted(TASKS))
        name, description, source, params, inputs = TASKS[task]
        p = params(rng)
        reference = source.format(**p)
        namespace: dict = {}
        exec(reference, namespace)  # our own code: computes the expected values
        tests = []
        for _ in range(self.n_tests):
            args = inputs(rng)
            call = f"{name}({', '.join(map(repr, args))})"
            tests.append(f"assert {call} == {namespace[name](*args)!r}, {call!r}")
        prompt = (f"Write a Python function `{name}` that {description.format(**p)}. "
                  f"Reply with the code in a ```python block.")
        return Problem(prompt, {"task": task, "entry_point": name, "tests": "\n".join(tests) + "\n",
                                "reference": f"```python\n{reference}```"})

    def verify(self, prompt, completion: str, metadata: dict) -> Reward:
        reply = strip_reasoning(completion)
        if reply is None:
            return Reward(0.0, {"reason": "the reasoning never ended"})
        result = run_tests(self.sandbox, extract_code(reply), metadata["tests"])
        return Reward(float(result.ok), result.info)

    def verify_many(self, prompts: list, completions: list[str], metadatas: list[dict]) -> list[Reward]:
        if not len(prompts) == len(completions) == len(metadatas):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(metadatas)} "
                             f"metadata: pass one of each per sample")
        with ThreadPoolExecutor(self.sandbox.workers) as pool:
            return list(pool.map(self.verify, prompts, completions, metadatas))
