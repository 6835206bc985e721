"""Multi-step word problems in the GSM8K style, from templates, with an integer answer and a worked
reference solution; and GSM8K itself, read from a path the user passes (its MIT-licensed data is
never copied into this repository). Both are verified alike: the last ``Answer: <number>`` line."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from kinetic.posttrain.envs.base import (
    ANSWER_INSTRUCTION,
    Environment,
    Problem,
    Reward,
    register,
    verify_number,
)

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
         "Maya", "Noor", "Oscar", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "stamps", "shells", "cards"]
THINGS = ["lamp", "backpack", "chair", "kettle", "jacket", "board game"]


def _shopping(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    packs, per, more = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
    give = rng.randint(1, packs * per)
    total = packs * per
    return (f"{name} buys {packs} packs of {item} with {per} {item} in each pack. {name} gives away {give} "
            f"{item} and then buys {more} more. How many {item} does {name} have now?",
            [f"{packs} packs of {per} make {packs} * {per} = {total} {item}.",
             f"After giving away {give}: {total} - {give} = {total - give}.",
             f"After buying {more} more: {total - give} + {more} = {total - give + more}."],
            total - give + more)


def _earnings(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    rate, hours, days = rng.randint(8, 30), rng.randint(2, 8), rng.randint(2, 6)
    earned = rate * hours * days
    cost = rng.randint(1, earned - 1)
    return (f"{name} earns ${rate} per hour and works {hours} hours a day for {days} days. Then {name} "
            f"spends ${cost} on a {thing}. How many dollars does {name} have left?",
            [f"Per day: {rate} * {hours} = {rate * hours} dollars.",
             f"In {days} days: {rate * hours} * {days} = {earned} dollars.",
             f"After the {thing}: {earned} - {cost} = {earned - cost}."],
            earned - cost)


def _sharing(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, extra = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 9)
    return (f"{name} has {friends * each} {item} and shares them equally among {friends} friends. Then "
            f"each friend finds {extra} more {item}. How many {item} does each friend have?",
            [f"Each friend gets {friends * each} / {friends} = {each}.",
             f"With {extra} more: {each} + {extra} = {each + extra}."],
            each + extra)


def _travel(rng):
    s1, h1, s2, h2 = rng.randint(40, 120), rng.randint(2, 5), rng.randint(30, 100), rng.randint(2, 4)
    return (f"A train travels at {s1} km per hour for {h1} hours, then at {s2} km per hour for {h2} hours. "
            f"How many kilometers does it travel in total?",
            [f"First part: {s1} * {h1} = {s1 * h1} km.", f"Second part: {s2} * {h2} = {s2 * h2} km.",
             f"Total: {s1 * h1} + {s2 * h2} = {s1 * h1 + s2 * h2} km."],
            s1 * h1 + s2 * h2)


def _ages(rng):
    a, b = rng.sample(NAMES, 2)
    age, k, years = rng.randint(3, 15), rng.randint(2, 4), rng.randint(1, 10)
    return (f"{a} is {age} years old. {b} is {k} times as old as {a}. In {years} years, what will be the "
            f"sum of their ages?",
            [f"{b} is {k} * {age} = {k * age} years old.",
             f"In {years} years: {age + years} and {k * age + years}.",
             f"Sum: {age + years} + {k * age + years} = {age + k * age + 2 * years}."],
            age + k * age + 2 * years)


def _discount(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    price, pct, n = 20 * rng.randint(1, 15), rng.choice([5, 10, 15, 20, 25, 50]), rng.randint(2, 6)
    sale = price * (100 - pct) // 100
    return (f"A {thing} costs ${price}. It is on sale for {pct}% off. {name} buys {n} of them at the sale "
            f"price. How many dollars does {name} pay?",
            [f"The discount is {price} * {pct} / 100 = {price * pct // 100} dollars.",
             f"The sale price is {price} - {price * pct // 100} = {sale} dollars.",
             f"For {n}: {sale} * {n} = {sale * n}."],
            sale * n)


def _harvest(rng):
    name = rng.choice(NAMES)
    rows, per, fruit, box = rng.randint(2, 8), rng.randint(3, 10), rng.randint(2, 9), rng.randint(4, 12)
    total = rows * per * fruit
    return (f"{name} plants {rows} rows of tomato plants with {per} plants in each row. Each plant gives "
            f"{fruit} tomatoes. {name} packs the tomatoes into boxes of {box}. How many boxes can "
            f"{name} fill completely?",
            [f"Plants: {rows} * {per} = {rows * per}.", f"Tomatoes: {rows * per} * {fruit} = {total}.",
             f"Full boxes: {total} // {box} = {total // box} (with {total % box} left over)."],
            total // box)


def _library(rng):
    out, back, weeks = rng.randint(5, 30), rng.randint(1, 20), rng.randint(2, 8)
    out = max(out, back + 1)
    start = rng.randint(weeks * (out - back) + 1, weeks * (out - back) + 500)
    return (f"A library has {start} books. Each week it lends out {out} books and gets {back} back. "
            f"How many books are in the library after {weeks} weeks?",
            [f"Each week it loses {out} - {back} = {out - back} books.",
             f"In {weeks} weeks: {out - back} * {weeks} = {(out - back) * weeks}.",
             f"Left: {start} - {(out - back) * weeks} = {start - (out - back) * weeks}."],
            start - (out - back) * weeks)


TEMPLATES = [_shopping, _earnings, _sharing, _travel, _ages, _discount, _harvest, _library]


@register("word_problems")
class WordProblems(Environment):
    """Templated two-to-three-step word problems with a worked reference solution."""

    def generate(self, rng: random.Random) -> Problem:
        template = rng.choice(TEMPLATES)
        question, steps, answer = template(rng)
        reference = "\n".join(steps) + f"\nAnswer: {answer}"
        metadata = {"answer": str(answer), "template": template.__name__.strip("_"), "reference": reference}
        return Problem(f"{question} {ANSWER_INSTRUCTION}", metadata)

    def verify(self, prompt, completion: str, metadata: dict) -> Reward:
        return verify_number(completion, metadata["answer"])


@register("gsm8k")
class GSM8K(WordProblems):
    """GSM8K problems from ``<path>/<split>.jsonl`` (``question``/``answer`` records, the answer
    ending in ``#### <number>``). ``problem(seed, index)`` walks a seeded shuffle of the split,
    wrapping around past its end."""

    def __init__(self, path: str | Path, split: str = "test"):
        file = Path(path) / f"{split}.jsonl"
        if not file.is_file():
            raise FileNotFoundError(f"GSM8K split {split!r} not found at {file}; pass path= the directory "
                                    f"holding train.jsonl/test.jsonl (e.g. ../shared/data/gsm8k)")
        with open(file) as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def problem(self, seed: int, index: int) -> Problem:
        if seed not in self._orders:
            order = list(range(len(self.records)))
            random.Random(f"{self.name}:{seed}").shuffle(order)
            self._orders[seed] = order
        return gsm8k_problem(self.records[self._orders[seed][index % len(self.records)]])


def gsm8k_problem(record: dict) -> Problem:
    solution, answer = record["answer"].rsplit("####", 1)
    answer = answer.strip().replace(",", "")
    steps = re.sub(r"<<[^>]*>>", "", solution).strip()  # drop the calculator annotations
    return Problem(f"{record['question']} {ANSWER_INSTRUCTION}",
                   {"answer": answer, "reference": f"{steps}\nAnswer: {answer}"})
