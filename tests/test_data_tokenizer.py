"""Byte-level BPE tokenizer: exact round trips (unicode, code with tabs, English), fixed special-token
ids that match the model config, save/load, and special strings in text staying plain text."""

from __future__ import annotations

from pathlib import Path

import pytest

from kinetic.config import ModelConfig
from kinetic.data.sources import iter_documents
from kinetic.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

FIXTURE = Path(__file__).parent / "fixtures" / "data"
TEXTS = {
    "english": "Fellow-Citizens of the Senate and House of Representatives: I feel much satisfaction.",
    "unicode": "naïve café — Grüße, 日本語のテキスト, Ελληνικά, עברית, 🙂👍🏽, ∀x∈ℝ: x²≥0\u00a0\u200b",
    "code": "def f(x):\n\tif x:\n\t\treturn  x  # two spaces\n    else:\r\n        pass\n\n\n   \t \n",
    "empty": "",
    "whitespace": " \n\t  \r\n",
    "specials_as_text": "a <eos> in a document, <|user|> and <pad><bos> stay text",
}


@pytest.fixture(scope="module")
def tok():
    names = ("sotu", "python_code", "python_docs")
    docs = [d for name in names for d in iter_documents(name, FIXTURE / name)]
    return train_tokenizer(docs, vocab_size=600)


@pytest.mark.parametrize("kind", list(TEXTS))
def test_round_trip(tok, kind):
    text = TEXTS[kind]
    ids = encode(tok, text)
    assert decode(tok, ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # raw text never yields a special id


def test_special_token_ids_match_the_model_config(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert SPECIAL_TOKENS[:3] == ("<pad>", "<bos>", "<eos>")
    config = ModelConfig()
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)


def test_bos_eos_framing_and_decoding_specials(tok):
    ids = encode(tok, "Hi", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert decode(tok, ids) == "<bos>Hi<eos>"
    assert decode(tok, ids, skip_special_tokens=True) == "Hi"


def test_vocab_size_and_learned_merges(tok):
    assert tok.get_vocab_size() == 600
    assert len(encode(tok, TEXTS["english"])) < 0.6 * len(TEXTS["english"].encode())  # merges compress


def test_save_load_gives_the_same_tokenizer(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / TOKENIZER_FILE
    for source in (tmp_path / "ckpt", path):
        loaded = load_tokenizer(source)
        for text in TEXTS.values():
            assert encode(loaded, text) == encode(tok, text)
            assert decode(loaded, encode(loaded, text)) == text


def test_training_is_deterministic():
    docs = list(iter_documents("sotu", FIXTURE / "sotu"))
    assert train_tokenizer(docs, 400).to_str() == train_tokenizer(docs, 400).to_str()


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*262"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="kinetic tokenizer train"):
        load_tokenizer(tmp_path)
