"""String transformations: reverse a string, sort its letters, sort words, count a letter. The
answer is the last ``Answer: <value>`` line; text answers compare exactly (case included) once
surrounding quotes or backticks are removed, counts compare as numbers."""

from __future__ import annotations

import random
import string

from kinetic.posttrain.envs.base import (
    ANSWER_INSTRUCTION,
    Environment,
    Problem,
    Reward,
    register,
    verify_number,
    verify_text,
)

WORDS = ["river", "apple", "cloud", "stone", "tiger", "lemon", "piano", "ocean", "maple", "ember", "quartz",
         "violet", "harbor", "candle", "falcon", "meadow", "pepper", "silver", "willow", "zephyr"]


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _reverse(rng):
    s = _letters(rng, 4, 12)
    return f"Reverse the string `{s}`.", s[::-1]


def _sort_letters(rng):
    s = _letters(rng, 4, 12)
    return f"Sort the letters of `{s}` in alphabetical order.", "".join(sorted(s))


def _sort_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 6))
    return (f"Sort these words alphabetically and write them separated by single spaces: {' '.join(words)}.",
            " ".join(sorted(words)))


def _count_letter(rng):
    s = _letters(rng, 8, 20)
    letter = rng.choice(s) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
    return f"How many times does the letter `{letter}` appear in `{s}`?", str(s.count(letter))


TASKS = {"reverse": _reverse, "sort_letters": _sort_letters, "sort_words": _sort_words,
         "count_letter": _count_letter}


@register("strings")
class StringTransforms(Environment):
    def __init__(self, tasks: tuple[str, ...] = tuple(TASKS)):
        unknown = set(tasks) - set(TASKS)
        if not tasks or unknown:
            raise ValueError(f"tasks={tasks!r}: choose from {sorted(TASKS)}")
        self.tasks = tuple(tasks)

    def generate(self, rng: random.Random) -> Problem:
        task = rng.choice(self.tasks)
        question, answer = TASKS[task](rng)
        return Problem(f"{question} {ANSWER_INSTRUCTION}",
                       {"task": task, "answer": answer, "reference": f"Answer: {answer}"})

    def verify(self, prompt, completion: str, metadata: dict) -> Reward:
        verify = verify_number if metadata["task"] == "count_letter" else verify_text
        return verify(completion, metadata["answer"])
