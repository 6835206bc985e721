"""Chat templates: a list of ``{"role", "content"}`` messages -> prompt token ids.

A checkpoint may carry its own template the way Hugging Face tokenizers do: a Jinja ``chat_template``
in ``tokenizer_config.json`` (or a ``chat_template.jinja`` file beside it). It is rendered as
transformers renders it (sandboxed Jinja with ``trim_blocks``/``lstrip_blocks``; variables
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``; ``raise_exception``), and the
special-token names in the rendered text become their ids. Without one, the built-in format frames
each turn with kinetic's role tokens and ends it with ``<eos>``:

    <|system|>Be brief.<eos><|user|>Hi<eos><|assistant|>Hello!<eos><|user|>Bye<eos><|assistant|>

In the built-in format message text is always encoded as plain text, so a user who types ``<eos>``
cannot forge a turn; fine-tuning code should build its examples with :func:`encode_builtin` so that
training and serving agree token for token. kinetic's checkpoints carry the built-in format as Jinja
(:data:`kinetic.data.tokenizer.CHAT_TEMPLATE`) for other tools; :meth:`ChatTemplate.from_pretrained`
recognises that text and keeps the built-in encoding, so such a checkpoint encodes exactly as one
without a template.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from kinetic.data.tokenizer import ASSISTANT_ID, CHAT_TEMPLATE, EOS_ID, SYSTEM_ID, USER_ID, encode

CONFIG_FILE = "tokenizer_config.json"
JINJA_FILE = "chat_template.jinja"
ROLE_IDS = {"system": SYSTEM_ID, "developer": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Plain ``{"role", "content": str}`` dicts; OpenAI content-part lists are joined, ``None`` -> ""."""
    if not messages:
        raise ValueError("messages must hold at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_IDS:
            raise ValueError(f"messages[{i}] must be a dict with role in {sorted(ROLE_IDS)}; got {m!r}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string; got {type(content).__name__}")
        check_unicode(content, f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for system
        out.append({**m, "role": role, "content": content})
    return out


def check_unicode(text: str, what: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``) that no UTF-8 tokenizer accepts: a client error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid Unicode: {err.reason} at position {err.start}") from None


def encode_builtin(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` in the built-in format (see the module docstring)."""
    ids: list[int] = []
    for m in normalize_messages(messages):
        ids += [ROLE_IDS[m["role"]], *encode(tok, m["content"]), EOS_ID]
    if add_generation_prompt:
        ids.append(ASSISTANT_ID)
    return ids


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template (Jinja ``source``) or, when ``source`` is None, the built-in one."""

    source: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @property
    def is_reasoning(self) -> bool:
        """The reasoning chat format of post-trained checkpoints (kinetic.data.chat)."""
        from kinetic.data.chat import REASONING_TEMPLATE

        return self.source == REASONING_TEMPLATE

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ChatTemplate:
        """The template in ``directory`` (``chat_template.jinja`` or ``tokenizer_config.json``), else
        the built-in one; kinetic's own Jinja rendering of the built-in format is the built-in one.
        Without jinja2 installed a Jinja template cannot be rendered: warn, use the built-in one."""
        directory = Path(directory)
        config = {}
        if (directory / CONFIG_FILE).is_file():
            try:
                config = json.loads((directory / CONFIG_FILE).read_text())
            except (ValueError, UnicodeDecodeError) as err:
                raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON ({err}); fix or delete it "
                                 "(without it the built-in chat template is used)") from None
            if not isinstance(config, dict):
                raise ValueError(f"{directory / CONFIG_FILE} must hold a JSON object; fix or delete it")
        source = config.get("chat_template")
        if isinstance(source, list):  # transformers' named templates: [{"name", "template"}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if (directory / JINJA_FILE).is_file():
            source = (directory / JINJA_FILE).read_text()
        if not source or source == CHAT_TEMPLATE:
            return cls()
        try:
            import jinja2  # noqa: F401
        except ImportError:
            warnings.warn(f"{directory} has a Jinja chat template but jinja2 is not installed "
                          "(pip install jinja2); using the built-in template instead", stacklevel=2)
            return cls()
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @property
    def is_builtin(self) -> bool:
        return self.source is None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The Jinja template's text for ``messages`` (only for a Jinja template)."""
        if self.source is None:
            raise ValueError("the built-in template is defined on token ids; use encode()")
        template = _environment().from_string(self.source)
        try:
            return template.render(messages=normalize_messages(messages),
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except Exception as err:  # jinja2.TemplateError or raise_exception(...) in the template
            raise ValueError(f"chat template failed: {err}") from err

    def encode(self, tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
               enable_thinking: bool = True) -> list[int]:
        """Prompt token ids for ``messages``. The reasoning format encodes message text as plain text
        (:func:`kinetic.data.chat.encode_chat`) and takes ``enable_thinking``."""
        if self.source is None:
            return encode_builtin(tok, messages, add_generation_prompt)
        if self.is_reasoning:
            from kinetic.data.chat import encode_chat

            return encode_chat(tok, messages, add_generation_prompt=add_generation_prompt,
                               enable_thinking=enable_thinking)[0]
        return encode_with_special_tokens(tok, self.render(messages, add_generation_prompt))

    def stop_token_ids(self, tok: Tokenizer) -> list[int]:
        """Ids that end an assistant turn: <eos> for the built-in format, else the template's eos."""
        if self.source is None or self.eos_token is None:
            return [EOS_ID]
        eos = tok.token_to_id(self.eos_token)
        return [EOS_ID] if eos is None else [eos]


def encode_with_special_tokens(tok: Tokenizer, text: str) -> list[int]:
    """Encode rendered template text, mapping special-token names to their ids.

    kinetic tokenizers never make special ids from raw text (``encode_special_tokens``); a template's
    output is the one place where the names are meant, so it is split on them here instead of
    flipping that shared tokenizer setting (the server encodes from several threads)."""
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    if not specials:
        return encode(tok, text)
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for piece in re.split(pattern, text):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids += encode(tok, piece)
    return ids


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _environment():
    """The Jinja environment transformers uses for chat templates."""
    from kinetic.data.chat import jinja_environment

    return jinja_environment()
