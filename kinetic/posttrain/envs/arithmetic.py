"""Multi-digit addition, subtraction and multiplication. The answer is the last ``Answer: <integer>``
line after the reasoning (see :func:`kinetic.posttrain.envs.base.final_answer`)."""

from __future__ import annotations

import random

from kinetic.posttrain.envs.base import (
    ANSWER_INSTRUCTION,
    Environment,
    Problem,
    Reward,
    register,
    verify_number,
)

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@register("arithmetic")
class Arithmetic(Environment):
    """``a op b`` with operands of ``min_digits``..``max_digits`` digits (multiplication: the
    second operand has at most ``max_mul_digits``, so products stay learnable by small models)."""

    def __init__(self, min_digits: int = 1, max_digits: int = 4, max_mul_digits: int = 2,
                 ops: str = "+-*"):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits ({min_digits}) <= max_digits ({max_digits})")
        if not ops or set(ops) - set(OPS):
            raise ValueError(f"ops={ops!r} must be a non-empty subset of '+-*'")
        self.min_digits, self.max_digits, self.max_mul_digits, self.ops = (
            min_digits, max_digits, max_mul_digits, ops)

    def _operand(self, rng: random.Random, max_digits: int) -> int:
        digits = rng.randint(self.min_digits, max(self.min_digits, max_digits))
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    def generate(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a = self._operand(rng, self.max_digits)
        b = self._operand(rng, self.max_mul_digits if op == "*" else self.max_digits)
        answer = OPS[op](a, b)
        prompt = f"What is {a} {op} {b}? {ANSWER_INSTRUCTION}"
        reference = f"{a} {op} {b} = {answer}\nAnswer: {answer}"
        return Problem(prompt, {"answer": str(answer), "reference": reference})

    def verify(self, prompt, completion: str, metadata: dict) -> Reward:
        return verify_number(completion, metadata["answer"])
