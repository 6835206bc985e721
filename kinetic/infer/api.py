"""The OpenAI-compatible API's shapes, for :mod:`kinetic.infer.server`: the request schemas (which
refuse what the server would refuse, so that ``/openapi.json`` describes the server), the response
schemas that document the answers, and the log-prob formats (the completions API's legacy format and
the chat format with UTF-8 bytes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from tokenizers import Tokenizer

from kinetic.infer.decoder import Token

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit; vLLM's default max_logprobs)
LOGPROB_FLOOR = -9999.0  # what -inf is reported as (JSON has no infinity; vLLM's convention)


# ---------------------------------------------------------------------- request schemas
class _Strict(BaseModel):
    # strict: "8" is not an int and "yes" is not a bool; unknown fields are ignored, as clients send
    # options that do not change the answer (user, metadata, store, ...); those that would are refused
    model_config = ConfigDict(strict=True, extra="ignore")


def _whole(value):
    """JSON Schema counts 1.0 as an integer, so this server does too (strict mode would not)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Whole(**bounds):  # noqa: N802 (a type)
    """An integer field with ``bounds`` (ge, le) that also takes 1.0; the bounds come first so that the
    schema shows them as minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


NonEmpty = Annotated[str, Field(min_length=1)]
TokenId = Whole(ge=0)
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Nothing = Annotated[list[Any], Field(max_length=0)]  # a list field accepted only empty


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"]


# name -> why it is refused; each field below accepts only its neutral value (and null)
REFUSED = {
    **dict.fromkeys(("tools", "tool_choice", "functions", "function_call"),
                    "tool calling is not implemented"),
    "response_format": "only plain text output is implemented ({\"type\": \"text\"})",
    "logit_bias": "logit bias is not implemented", "suffix": "insertion (suffix) is not implemented",
    "best_of": "best_of > 1 is not implemented",
    **dict.fromkeys(("presence_penalty", "frequency_penalty", "repetition_penalty"),
                    "penalties are not implemented"),
    **dict.fromkeys(("guided_json", "guided_regex", "guided_choice", "guided_grammar"),
                    "guided decoding is not implemented"),
}


class SamplingFields(_Strict):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Whole(ge=-1) | None = None  # vLLM's extension; 0 or -1 = off
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's extension; 0 = off
    n: Whole(ge=1) | None = None
    # any integer: the generator takes it modulo 2**64 (bounds at +-2**63 disagree with clients that
    # compare numbers as floats there: the fuzz test sent -2**63 - 2048, which equals -2**63 as a float)
    seed: Whole() | None = None
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension
    # refused unless neutral (see REFUSED)
    tools: Nothing | None = None
    tool_choice: Literal["none"] | None = None
    functions: Nothing | None = None
    function_call: Literal["none"] | None = None
    response_format: TextFormat | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    repetition_penalty: float | None = Field(None, ge=1, le=1)
    guided_json: None = None
    guided_regex: None = None
    guided_choice: None = None
    guided_grammar: None = None


class CompletionRequest(SamplingFields):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)]
    max_tokens: Whole(ge=0) | None = None  # 0: nothing generated (with echo: the prompt scored)
    echo: bool | None = False
    logprobs: Whole(ge=0, le=MAX_LOGPROBS) | None = None  # top alternatives per token
    suffix: Annotated[str, Field(max_length=0)] | None = None
    best_of: Whole(ge=1, le=1) | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatTemplateKwargs(_Strict):
    """vLLM's ``chat_template_kwargs``, for a checkpoint with the reasoning chat format."""

    model_config = ConfigDict(strict=True, extra="forbid")  # an unknown key would change nothing silently
    enable_thinking: bool = True  # False: the answer starts at once (a pre-closed think block)
    reasoning_budget: Whole(ge=0) | None = None  # reasoning tokens before </think> is forced


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    max_tokens: Whole(ge=1) | None = None
    max_completion_tokens: Whole(ge=1) | None = None
    logprobs: bool | None = False
    top_logprobs: Whole(ge=0, le=MAX_LOGPROBS) | None = None  # used when logprobs is true


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # kinetic's tokenizers add no BOS/EOS either way
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


# ---------------------------------------------------------------------- response schemas (documentation)
class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Doc):
    error: ErrorDetail


class UsageInfo(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LegacyLogprobs(_Doc):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for the first prompt token (nothing predicts it)
    top_logprobs: list[dict[str, float] | None]  # the top alternatives and the chosen token
    text_offset: list[int]


Finish = Literal["stop", "length"] | None


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: Finish


class CompletionResponse(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # absent from stream chunks but the last (stream_options)


class TopLogprob(_Doc):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Doc):
    content: list[TokenLogprob]
    refusal: None = None


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str
    reasoning_content: str | None = None  # the reasoning, for a reasoning chat format (else absent)


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Finish


class ChatCompletionResponse(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class TokenizeResponse(_Doc):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(_Doc):
    prompt: str


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


ERRORS = {400: "invalid request: OpenAI's error body, ``param`` names the field. A request this schema "
               "rejects gets code invalid_request, unsupported_parameter or invalid_json; one it accepts "
               "can still be refused for its values: code context_length_exceeded or invalid_value "
               "(over a server limit, token ids outside the vocabulary, lone surrogates)",
          404: "unknown model", 413: "request body over --max-request-bytes",
          429: "queue full (--max-queue); retry later", 500: "generation failed inside the engine"}


# one server-sent event (OpenAPI before 3.2 describes each event with the media type's schema)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a chunk of the answer as JSON (chat: object chat.completion.chunk), an "
    "error body, or [DONE] as the last event"}}}


def documented_responses(model: type[BaseModel] | None, *errors: int, stream: bool = False) -> dict:
    out: dict = {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in errors}
    if model is not None:
        out[200] = {"model": model, "description": "the answer"}
    if stream:
        out[200]["description"] = ("the answer; with stream: true, server-sent events of chunks ending "
                                   "data: [DONE]")
        out[200]["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    return out


# ---------------------------------------------------------------------- log-prob formats
def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's bytes_to_unicode), inverted: token character -> byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class TokenText:
    """Token ids as the strings and UTF-8 bytes the log-prob formats show. A byte-level token that
    holds part of a character shows U+FFFD in its string; its ``bytes`` are exact."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._special = set(tokenizer.get_added_tokens_decoder())
        self._byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        self._alphabet = _unicode_to_byte()
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            piece = self.tokenizer.id_to_token(token_id) or ""
            if self._byte_level and token_id not in self._special and all(c in self._alphabet for c in piece):
                self._bytes[token_id] = bytes(self._alphabet[c] for c in piece)
            else:
                self._bytes[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        return self._bytes[token_id]

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def legacy(self, items: list[tuple[int, Token | None]], offset: int = 0) -> dict:
        """The completions format of (id, Token or None when unscored) pairs; text offsets from ``offset``."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, token in items:
            text = self.text(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if token is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {}
            for alt, logprob in token.top or ():
                top.setdefault(self.text(alt), _finite(logprob))
            top.setdefault(text, _finite(token.logprob))  # the chosen token is always listed
            out["token_logprobs"].append(_finite(token.logprob))
            out["top_logprobs"].append(top)
        return out

    def _entry(self, token_id: int, logprob: float) -> dict:
        raw = self.bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _finite(logprob),
                "bytes": list(raw)}

    def chat(self, tokens: list[Token]) -> dict:
        """The chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}."""
        return {"content": [{**self._entry(t.id, t.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in t.top or ()]} for t in tokens],
                "refusal": None}
