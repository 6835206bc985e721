"""The reasoning chat format (post-training's, and what a post-trained checkpoint serves): kinetic's
role tokens with Nemotron 3's reasoning conventions, as a Jinja template (:data:`REASONING_TEMPLATE`)
rendered with ``jinja2``:

    <|system|>Be brief.<eos><|user|>What is 2 + 3?<eos>
    <|assistant|><think>2 plus 3 is 5.</think>Answer: 5<eos>          (one line, broken here)

* reasoning sits inside ``<think>...</think>`` (an assistant message's ``reasoning_content``, the
  field vLLM and OpenAI-compatible servers use);
* reasoning of turns before the last user message is dropped from the context: those turns keep an
  empty ``<think></think>``;
* the generation prompt is ``<|assistant|><think>``, or with ``enable_thinking=False`` the empty,
  pre-closed ``<|assistant|><think></think>``;
* tool results are ``<|tool|>...<eos>`` turns; an assistant's ``tool_calls`` follow its content as
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` text.

``<think>``, ``</think>`` and ``<|tool|>`` are special tokens (:data:`CHAT_TOKENS`); a tokenizer
without them gains them with :func:`add_chat_tokens`.

The template marks two kinds of span with variables that are empty unless kinetic sets them, so
that transformers renders the same text: message text (``text_start``/``text_end``), which is always
encoded as plain text (a user who types ``</think>`` or ``<eos>`` cannot forge a token), and what the
model is trained to produce (``gen_start``/``gen_end``: an assistant turn after its role token, its
reasoning, answer and ``<eos>``). :func:`encode_chat` returns the ids and that loss mask;
:func:`training_chats` splits a chat with reasoning in k assistant turns into k training chats, each
ending with one of them (its reasoning kept, the earlier ones dropped, as at inference).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer

from kinetic.data.tokenizer import encode

CHAT_TOKENS = ("<think>", "</think>", "<|tool|>")
ROLES = ("system", "developer", "user", "assistant", "tool")
# span markers: control characters that message text may not hold
TEXT_START, TEXT_END, GEN_START, GEN_END = "\x02", "\x03", "\x0e", "\x0f"
MARKERS = {"text_start": TEXT_START, "text_end": TEXT_END, "gen_start": GEN_START, "gen_end": GEN_END}

REASONING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] in ['system', 'developer'] -%}"
    "<|system|>{{ text_start }}{{ m['content'] }}{{ text_end }}<eos>"
    "{%- elif m['role'] == 'user' -%}<|user|>{{ text_start }}{{ m['content'] }}{{ text_end }}<eos>"
    "{%- elif m['role'] == 'tool' -%}<|tool|>{{ text_start }}{{ m['content'] }}{{ text_end }}<eos>"
    "{%- elif m['role'] == 'assistant' -%}<|assistant|>"
    "{%- if loop.index0 >= (train_from or 0) -%}{{ gen_start }}{%- endif -%}<think>"
    "{%- if loop.index0 > ns.last_user and m.get('reasoning_content') -%}"
    "{{ text_start }}{{ m['reasoning_content'] }}{{ text_end }}{%- endif -%}</think>"
    "{{ text_start }}{{ m['content'] or '' }}{{ text_end }}"
    "{%- for call in m.get('tool_calls') or [] -%}<tool_call>{{ text_start }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ text_end }}</tool_call>{%- endfor -%}<eos>"
    "{%- if loop.index0 >= (train_from or 0) -%}{{ gen_end }}{%- endif -%}"
    "{%- else -%}{{ raise_exception('unknown role ' ~ m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|><think>"
    "{%- if enable_thinking is defined and not enable_thinking -%}</think>{%- endif -%}"
    "{%- endif -%}"
)


def add_chat_tokens(tok: Tokenizer) -> list[int]:
    """Give ``tok`` the special tokens of :data:`CHAT_TOKENS` it lacks (appended after its vocabulary;
    a model then needs embedding rows for them); returns their ids, in that order."""
    missing = [t for t in CHAT_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return [tok.token_to_id(t) for t in CHAT_TOKENS]


def _check(messages: Sequence[dict]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] must be a dict with role in {list(ROLES)}; got {m!r}")
        m = dict(m)
        for key in ("content", "reasoning_content"):
            value = m.get(key)
            if isinstance(value, list):  # OpenAI content parts
                value = "".join(p.get("text", "") for p in value if isinstance(p, dict))
            if value is not None and not isinstance(value, str):
                raise ValueError(f"messages[{i}].{key} must be a string; got {type(value).__name__}")
            if value and any(c in value for c in MARKERS.values()):
                raise ValueError(f"messages[{i}].{key} holds a control character (\\x02, \\x03, \\x0e or "
                                 "\\x0f); remove it")
            m[key] = value
        if m["content"] is None and m["role"] != "assistant":
            m["content"] = ""
        for j, call in enumerate(m.get("tool_calls") or []):
            if not isinstance(call, dict) or not isinstance(call.get("function"), dict) \
                    or "name" not in call["function"]:
                raise ValueError(f"messages[{i}].tool_calls[{j}] must be "
                                 "{'function': {'name': ..., 'arguments': ...}}")
        out.append(m)
    if not out:
        raise ValueError("messages must hold at least one message")
    return out


def render(messages: Sequence[dict], *, add_generation_prompt: bool = False, enable_thinking: bool = True,
           train_from: int = 0, marked: bool = False) -> str:
    """The template's text for ``messages``; ``marked`` keeps the span markers (for
    :func:`encode_chat`); assistant turns from index ``train_from`` on are the trained spans."""
    template = jinja_environment().from_string(REASONING_TEMPLATE)
    names = MARKERS if marked else {k: "" for k in MARKERS}
    return template.render(messages=_check(messages), add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking, train_from=train_from, **names)


def encode_chat(tok: Tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                enable_thinking: bool = True, train_from: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of ``messages`` and their loss mask (1 on what an assistant turn from index
    ``train_from`` on produces: its reasoning, answer and end-of-turn token). Message text is encoded
    as plain text; the template's special-token names become their ids (the tokenizer must have
    :data:`CHAT_TOKENS`: :func:`add_chat_tokens`)."""
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    absent = [t for t in CHAT_TOKENS if t not in specials]
    if absent:
        raise ValueError(f"the tokenizer has no {absent} special tokens; add them with "
                         "kinetic.posttrain.chat.add_chat_tokens (a model then needs rows for them)")
    text = render(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                  train_from=train_from, marked=True)
    ids: list[int] = []
    mask: list[int] = []
    trained = in_text = False
    structure = ""

    def flush() -> None:  # template text between markers: special-token names and literal text
        nonlocal structure
        rest = structure
        while rest:
            name = next((s for s in sorted(specials, key=len, reverse=True) if rest.startswith(s)), None)
            if name is not None:
                ids.append(specials[name])
                mask.append(int(trained))
                rest = rest[len(name):]
                continue
            cut = min((i for i in (rest.find(s) for s in specials) if i > 0), default=len(rest))
            piece = encode(tok, rest[:cut])
            ids.extend(piece)
            mask.extend([int(trained)] * len(piece))
            rest = rest[cut:]
        structure = ""

    buffer = ""
    for ch in text:
        if ch in (TEXT_START, TEXT_END, GEN_START, GEN_END):
            if in_text:
                piece = encode(tok, buffer)
                ids.extend(piece)
                mask.extend([int(trained)] * len(piece))
                buffer = ""
            else:
                flush()
            in_text = {TEXT_START: True, TEXT_END: False}.get(ch, in_text)
            trained = {GEN_START: True, GEN_END: False}.get(ch, trained)
        elif in_text:
            buffer += ch
        else:
            structure += ch
    flush()
    return ids, mask


def training_chats(messages: Sequence[dict]) -> list[tuple[list[dict], int]]:
    """The training chats of one conversation, as (messages, train_from): a chat whose assistant turns
    carry reasoning becomes one chat per such turn, ending with it and training it alone (earlier
    turns appear with their reasoning dropped, as at inference); a chat without reasoning is one chat
    that trains every assistant turn."""
    messages = list(messages)
    reasoning = [i for i, m in enumerate(messages)
                 if m.get("role") == "assistant" and m.get("reasoning_content")]
    if not reasoning:
        return [(messages, 0)]
    return [(messages[:i + 1], i) for i in reasoning]


def jinja_environment():
    """The Jinja environment transformers renders chat templates in (sandboxed, ``trim_blocks``,
    ``lstrip_blocks``, ``tojson``, ``raise_exception``, ``strftime_now``)."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
