"""Byte-level BPE tokenizer: train with the ``tokenizers`` library, save/load ``tokenizer.json``.

Byte-level means every UTF-8 byte is a base token, so any text round-trips exactly:
``decode(tok, encode(tok, text)) == text``. The special tokens take the first ids, in this order, and
agree with the model config defaults (``pad_token_id=0, bos_token_id=1, eos_token_id=2``):

    0 <pad>   1 <bos>   2 <eos>   3 <|system|>   4 <|user|>   5 <|assistant|>

Special tokens are never produced from raw text: a document that literally contains ``<eos>`` is
encoded as ordinary bytes (``encode_special_tokens``), so only code that means it (packing, chat
templates) inserts a special id. ``tokenizer.json`` is the plain ``tokenizers`` format; beside it
:func:`save_tokenizer` writes a Hugging Face ``tokenizer_config.json`` (BOS/EOS/pad, the special tokens,
and :data:`CHAT_TEMPLATE`, the built-in chat format as Jinja), so transformers' ``AutoTokenizer``, vLLM
and lm-eval open a tokenizer or checkpoint directory with the right EOS and chat template.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>")
PAD_ID, BOS_ID, EOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID = range(len(SPECIAL_TOKENS))
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte + the special tokens

# kinetic's built-in chat format (kinetic.infer.chat_template) as a Hugging Face Jinja chat template:
# each turn is its role token, the text, <eos>; a generation prompt is <|assistant|>. OpenAI content
# parts are joined, None content is empty, "developer" is the system role. kinetic itself recognises
# this exact text and keeps encoding message text as plain text (ChatTemplate.from_pretrained).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'developer'] -%}<|system|>"
    "{%- elif message['role'] == 'user' -%}<|user|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>"
    "{%- else -%}{{ raise_exception('unknown role ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}<eos>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def train_tokenizer(documents: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                    max_token_length: int | None = 24, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on ``documents``. ``vocab_size`` counts bytes, merges and special tokens;
    the result may be smaller when the text runs out of pairs seen ``min_frequency`` times.
    ``max_token_length`` (characters) keeps long runs such as ``=-=-=-...`` rules out of the vocab."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                         f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  max_token_length=max_token_length, show_progress=show_progress)
    tok.train_from_iterator(documents, trainer)
    _check_special_ids(tok, "the trained tokenizer")
    tok.encode_special_tokens = True
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | Path, model_max_length: int | None = None,
                   chat_template: str | None = None) -> Path:
    """Write ``DIRECTORY/tokenizer.json`` and its ``tokenizer_config.json`` (creating the directory;
    ``chat_template`` defaults to the built-in one) and return the tokenizer.json path."""
    path = Path(directory) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    write_tokenizer_config(path.parent, model_max_length, chat_template)
    return path


def copy_tokenizer(source: str | Path, directory: str | Path, model_max_length: int | None = None) -> Path:
    """Copy a ``tokenizer.json`` (a file, or the one in a directory) into ``directory`` with a fresh
    ``tokenizer_config.json`` beside it, so the directory (e.g. a checkpoint) opens on its own. A chat
    template in a ``tokenizer_config.json`` beside the source (a post-trained model's) is kept."""
    source = Path(source)
    file = source / TOKENIZER_FILE if source.is_dir() else source
    target = Path(directory) / TOKENIZER_FILE
    shutil.copyfile(file, target)
    template = None
    beside = file.parent / TOKENIZER_CONFIG_FILE
    if beside.is_file():
        try:
            template = json.loads(beside.read_text()).get("chat_template")
        except (ValueError, UnicodeDecodeError, AttributeError):
            template = None  # a damaged config beside the source: the copy gets the built-in one
    write_tokenizer_config(target.parent, model_max_length, template if isinstance(template, str) else None)
    return target


def tokenizer_config(model_max_length: int | None = None, chat_template: str | None = None) -> dict:
    """The Hugging Face ``tokenizer_config.json`` of a kinetic tokenizer: its special tokens and a
    chat template (default: the built-in chat format as Jinja, :data:`CHAT_TEMPLATE`)."""
    pad, bos, eos, *roles = SPECIAL_TOKENS
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": None,
        "additional_special_tokens": roles,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for i, t in enumerate(SPECIAL_TOKENS)},
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # byte-level: decoding must give back the exact text
        "chat_template": chat_template or CHAT_TEMPLATE,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def write_tokenizer_config(directory: str | Path, model_max_length: int | None = None,
                           chat_template: str | None = None) -> Path:
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    path.write_text(json.dumps(tokenizer_config(model_max_length, chat_template), indent=2) + "\n")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` file, or the one inside a directory (a checkpoint or corpus)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file}; train one with `kinetic tokenizer train --out DIR`")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises a bare Exception for any bad file
        reason = str(err) or type(err).__name__
        raise ValueError(f"{file} is not a valid tokenizer.json ({reason}); copy it again from the "
                         "corpus or retrain it with `kinetic tokenizer train`") from None
    _check_special_ids(tok, str(file))
    tok.encode_special_tokens = True
    return tok


def encode(tok: Tokenizer, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of ``text``, optionally framed by ``<bos>`` / ``<eos>``."""
    ids = tok.encode(text, add_special_tokens=False).ids
    return [BOS_ID] * bos + ids + [EOS_ID] * eos


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def decode(tok: Tokenizer, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of ``ids``; special tokens are shown as their names unless ``skip_special_tokens``."""
    return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _check_special_ids(tok: Tokenizer, what: str) -> None:
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(f"{what}: special tokens {list(SPECIAL_TOKENS)} must have ids 0..{len(got) - 1}, "
                         f"got {got}; retrain it with kinetic.data.tokenizer.train_tokenizer")
