"""Instruction following with checkable constraints, in the spirit of IFEval: a short text under
two to four rules (word count, bullet points, a keyword, lowercase, an ending, no commas), or a
JSON object that must match a JSON schema. The reply is the text after the reasoning; a JSON reply
may sit in a ```json fence. Reward 1 when every rule holds (``partial=True``: the fraction that
holds); ``info`` lists the rules that failed.

:func:`schema_errors` checks the JSON-schema subset used here and refuses keywords outside it, so
a user's schema never passes for lack of support: ``type`` (one or a list), ``enum``, ``const``,
``minLength``/``maxLength``/``pattern``, ``minimum``/``maximum``/``exclusiveMinimum``/
``exclusiveMaximum``, ``items``/``minItems``/``maxItems``/``uniqueItems``, ``properties``/
``required``/``additionalProperties``."""

from __future__ import annotations

import json
import random
import re

from kinetic.posttrain.envs.base import Environment, Problem, Reward, register, strip_reasoning

TOPICS = ["the sea", "city gardens", "old trains", "winter mornings", "honey bees", "mountain lakes",
          "street markets", "paper kites"]
KEYWORDS = ["light", "quiet", "green", "journey", "morning", "water", "stone", "music"]
FILLER = ["small", "bright", "days", "bring", "calm", "air", "over", "the", "long", "road", "where",
          "people", "walk", "slowly", "and", "watch", "sky", "change", "from", "grey", "to", "gold",
          "while", "birds", "move", "between", "tall", "trees"]
ENDINGS = ["and that is all", "thank you for reading", "the end"]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _bullets(text: str) -> int:
    return sum(bool(re.match(r"\s*[-*] \S", line)) for line in text.splitlines())


CHECKS = {
    "word_range": lambda text, c: c["min"] <= len(_words(text)) <= c["max"],
    "bullets": lambda text, c: _bullets(text) == c["count"],
    "include": lambda text, c: re.search(rf"\b{re.escape(c['keyword'])}\b", text, re.IGNORECASE) is not None,
    "lowercase": lambda text, c: text == text.lower(),
    "end_with": lambda text, c: text.rstrip().rstrip(".!").endswith(c["phrase"]),
    "no_commas": lambda text, c: "," not in text,
}
RULES = {
    "word_range": lambda c: f"Use between {c['min']} and {c['max']} words.",
    "bullets": lambda c: f"Write exactly {c['count']} bullet points, each on a line starting with '- '.",
    "include": lambda c: f"Include the word '{c['keyword']}'.",
    "lowercase": lambda c: "Use only lowercase letters.",
    "end_with": lambda c: f"End your response with the phrase '{c['phrase']}'.",
    "no_commas": lambda c: "Do not use any commas.",
}


def _text_problem(rng: random.Random) -> Problem:
    optional = ["bullets", "include", "lowercase", "end_with", "no_commas"]
    kinds = ["word_range"] + rng.sample(optional, rng.randint(1, 3))
    constraints = []
    for kind in kinds:
        c = {"kind": kind}
        if kind == "word_range":
            c["min"] = rng.randint(15, 40)
            c["max"] = c["min"] + rng.randint(10, 30)
        elif kind == "bullets":
            c["count"] = rng.randint(2, 5)
        elif kind == "include":
            c["keyword"] = rng.choice(KEYWORDS)
        elif kind == "end_with":
            c["phrase"] = rng.choice(ENDINGS)
        constraints.append(c)
    topic = rng.choice(TOPICS)
    rules = "\n".join(f"- {RULES[c['kind']](c)}" for c in constraints)
    prompt = f"Write a short note about {topic}. Follow these rules:\n{rules}"
    return Problem(prompt, {"mode": "text", "constraints": constraints,
                            "reference": _reference_text(rng, constraints)})


def _reference_text(rng: random.Random, constraints: list[dict]) -> str:
    """A reply that keeps every rule: the keyword first, filler, the ending last, split into bullets."""
    by_kind = {c["kind"]: c for c in constraints}
    rng_words = by_kind["word_range"]
    head = [by_kind["include"]["keyword"]] if "include" in by_kind else []
    tail = by_kind["end_with"]["phrase"].split() if "end_with" in by_kind else []
    n = (rng_words["min"] + rng_words["max"]) // 2 - len(head) - len(tail)
    words = head + [rng.choice(FILLER) for _ in range(n)] + tail
    lines = by_kind["bullets"]["count"] if "bullets" in by_kind else 1
    cuts = [round(i * len(words) / lines) for i in range(lines + 1)]
    parts = [" ".join(words[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    return "\n".join(f"- {p}" for p in parts) if "bullets" in by_kind else parts[0]


# ---- JSON -----------------------------------------------------------------------------------------

COLORS = ["red", "green", "blue"]
FIELDS = {
    "name": ({"type": "string", "minLength": 1, "maxLength": 40}, lambda r: r.choice(["Ada", "Bo", "Cy"])),
    "age": ({"type": "integer", "minimum": 0, "maximum": 120}, lambda r: r.randint(0, 120)),
    "tags": ({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
             lambda r: r.sample(KEYWORDS, r.randint(1, 3))),
    "active": ({"type": "boolean"}, lambda r: r.random() < 0.5),
    "score": ({"type": "number", "minimum": 0, "maximum": 1}, lambda r: round(r.random(), 2)),
    "color": ({"type": "string", "enum": COLORS}, lambda r: r.choice(COLORS)),
    "address": ({"type": "object", "properties": {"city": {"type": "string"},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["city", "zip"], "additionalProperties": False},
                lambda r: {"city": r.choice(["Oslo", "Lima"]), "zip": f"{r.randint(0, 99999):05d}"}),
}
SUBJECTS = ["a library member", "a product", "a pet", "a sensor", "a club"]


def _json_problem(rng: random.Random) -> Problem:
    keys = rng.sample(sorted(FIELDS), rng.randint(2, 4))
    schema = {"type": "object", "properties": {k: FIELDS[k][0] for k in keys}, "required": keys,
              "additionalProperties": False}
    reference = json.dumps({k: FIELDS[k][1](rng) for k in keys})
    prompt = (f"Describe {rng.choice(SUBJECTS)} as a JSON object that matches this JSON schema:\n"
              f"{json.dumps(schema)}\nReply with the JSON object only.")
    return Problem(prompt, {"mode": "json", "schema": schema, "reference": reference})


def extract_json(reply: str):
    """The last ```json (or bare ```) fenced block if there is one, else the whole reply, parsed."""
    fenced = re.findall(r"```(?:json)?[ \t]*\n(.*?)```", reply, re.DOTALL)
    return json.loads(fenced[-1] if fenced else reply.strip())


JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
SCHEMA_KEYWORDS = {"type", "enum", "const", "minLength", "maxLength", "pattern", "minimum", "maximum",
                   "exclusiveMinimum", "exclusiveMaximum", "items", "minItems", "maxItems", "uniqueItems",
                   "properties", "required", "additionalProperties",
                   "title", "description", "$schema", "default", "examples"}  # annotations: no effect


def _is_type(value, name: str) -> bool:
    if name in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return name == "number" or float(value).is_integer()
    if name not in JSON_TYPES:
        known = sorted([*JSON_TYPES, "integer", "number"])
        raise ValueError(f"JSON schema type {name!r} unknown; use one of {known}")
    return isinstance(value, JSON_TYPES[name])


def schema_errors(value, schema: dict, path: str = "$") -> list[str]:
    """What in ``value`` breaks ``schema`` (empty when it matches), one line per problem."""
    unknown = set(schema) - SCHEMA_KEYWORDS
    if unknown:
        raise ValueError(f"JSON schema keywords {sorted(unknown)} at {path} are not supported; "
                         f"supported: {sorted(SCHEMA_KEYWORDS)}")
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: expected {schema['type']}, got {type(value).__name__}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        errors += _string_errors(value, schema, path)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        errors += _number_errors(value, schema, path)
    elif isinstance(value, list):
        errors += _array_errors(value, schema, path)
    elif isinstance(value, dict):
        errors += _object_errors(value, schema, path)
    return errors


def _size_errors(size: int, schema: dict, path: str, low: str, high: str, noun: str) -> list[str]:
    errors = [f"{path}: fewer than {schema[low]} {noun}"] if size < schema.get(low, 0) else []
    if size > schema.get(high, float("inf")):
        errors.append(f"{path}: more than {schema[high]} {noun}")
    return errors


def _string_errors(value: str, schema: dict, path: str) -> list[str]:
    errors = _size_errors(len(value), schema, path, "minLength", "maxLength", "characters")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: does not match {schema['pattern']!r}")
    return errors


def _number_errors(value: float, schema: dict, path: str) -> list[str]:
    bounds = [("minimum", lambda b: value >= b), ("maximum", lambda b: value <= b),
              ("exclusiveMinimum", lambda b: value > b), ("exclusiveMaximum", lambda b: value < b)]
    return [f"{path}: {value} breaks {key} {schema[key]}" for key, ok in bounds
            if key in schema and not ok(schema[key])]


def _array_errors(value: list, schema: dict, path: str) -> list[str]:
    errors = _size_errors(len(value), schema, path, "minItems", "maxItems", "items")
    if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) < len(value):
        errors.append(f"{path}: items are not unique")
    for i, item in enumerate(value):
        if "items" in schema:
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def _object_errors(value: dict, schema: dict, path: str) -> list[str]:
    errors = [f"{path}: missing {key!r}" for key in schema.get("required", []) if key not in value]
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            errors += schema_errors(item, properties[key], f"{path}.{key}")
        elif extra is False:
            errors.append(f"{path}: unexpected property {key!r}")
        elif isinstance(extra, dict):
            errors += schema_errors(item, extra, f"{path}.{key}")
    return errors


@register("instructions")
class InstructionFollowing(Environment):
    def __init__(self, json_fraction: float = 0.3, partial: bool = False):
        if not 0.0 <= json_fraction <= 1.0:
            raise ValueError(f"json_fraction={json_fraction} must lie in [0, 1]")
        self.json_fraction, self.partial = json_fraction, partial

    def generate(self, rng: random.Random) -> Problem:
        return _json_problem(rng) if rng.random() < self.json_fraction else _text_problem(rng)

    def verify(self, prompt, completion: str, metadata: dict) -> Reward:
        reply = strip_reasoning(completion)
        if reply is None:
            return Reward(0.0, {"reason": "the reasoning never ended"})
        if metadata["mode"] == "json":
            try:
                value = extract_json(reply)
            except ValueError as e:
                return Reward(0.0, {"reason": f"not JSON: {e}"})
            errors = schema_errors(value, metadata["schema"])
            return Reward(float(not errors), {"errors": errors} if errors else {})
        reply = reply.strip()
        failed = [c["kind"] for c in metadata["constraints"] if not CHECKS[c["kind"]](reply, c)]
        total = len(metadata["constraints"])
        value = (total - len(failed)) / total if self.partial else float(not failed)
        return Reward(value, {"failed": failed} if failed else {})
