"""Byte-level BPE tokenizer: train with the ``tokenizers`` library, save/load ``tokenizer.json``.

Byte-level means every UTF-8 byte is a base token, so any text round-trips exactly:
``decode(tok, encode(tok, text)) == text``. The special tokens take the first ids, in this order, and
agree with the model config defaults (``pad_token_id=0, bos_token_id=1, eos_token_id=2``):

    0 <pad>   1 <bos>   2 <eos>   3 <|system|>   4 <|user|>   5 <|assistant|>

Special tokens are never produced from raw text: a document that literally contains ``<eos>`` is
encoded as ordinary bytes (``encode_special_tokens``), so only code that means it (packing, chat
templates) inserts a special id. ``tokenizer.json`` is the plain ``tokenizers`` format, so Hugging Face
``PreTrainedTokenizerFast(tokenizer_file=...)`` reads it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>")
PAD_ID, BOS_ID, EOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID = range(len(SPECIAL_TOKENS))
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte + the special tokens


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


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Write ``DIRECTORY/tokenizer.json`` (creating the directory) and return its path."""
    path = Path(directory) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` file, or the one inside a directory (a checkpoint or corpus)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file}; train one with `kinetic tokenizer train --out DIR`")
    tok = Tokenizer.from_file(str(file))
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
