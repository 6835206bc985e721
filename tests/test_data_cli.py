"""`kinetic tokenizer train` and `kinetic data build` end to end on the fixture, their summaries, and
one-line errors with exit code 2 for mistakes a user can make (kinetic.cli.data)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kinetic.cli import main as kinetic_main
from kinetic.cli.data import parse_size, register
from kinetic.data.loader import BlendedLoader

FIXTURE = Path(__file__).parent / "fixtures" / "data"
DOMAINS = ("sotu", "python_code", "python_docs", "metamath")
SELECT = ["--domains", ",".join(DOMAINS), "--max-bytes-per-domain", "40K", "--val-fraction", "0.1"]
for _name in DOMAINS:
    SELECT += ["--source-root", f"{_name}={FIXTURE / _name}"]


def main(argv: list[str]) -> int:
    """``kinetic ARGV`` in-process; its exit code."""
    try:
        return kinetic_main(argv)
    except SystemExit as done:
        return done.code


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["tokenizer", "train", "--out", str(root / "tok"), "--vocab-size", "512", *SELECT]) == 0
    assert main(["data", "build", "--out", str(root / "corpus"), "--tokenizer", str(root / "tok"),
                 "--workers", "1", *SELECT]) == 0
    return root


def test_tokenizer_train_writes_tokenizer_and_summary(built):
    summary = json.loads((built / "tok" / "tokenizer_summary.json").read_text())
    assert (built / "tok" / "tokenizer.json").is_file()
    config = json.loads((built / "tok" / "tokenizer_config.json").read_text())  # opens in transformers
    assert config["eos_token"] == "<eos>" and "<|assistant|>" in config["chat_template"]
    assert summary["vocab_size"] == 512 and set(summary["domains"]) == set(DOMAINS)
    assert all(d["val_bytes_per_token"] > 1 for d in summary["domains"].values())


def test_data_build_writes_corpus_and_summary(built, capsys):
    summary = json.loads((built / "corpus" / "summary.json").read_text())
    assert set(summary["domains"]) == set(DOMAINS) and summary["tokens"] > 0
    assert all(d["bytes"] <= 40_000 for d in summary["domains"].values())
    loader = BlendedLoader(built / "corpus", weights=dict.fromkeys(DOMAINS, 1.0), seq_len=16, batch_size=2)
    assert loader.next_batch().shape == (2, 17)


def test_output_names_domains_bytes_tokens_and_time(tmp_path, built, capsys):
    assert main(["data", "build", "--out", str(tmp_path), "--tokenizer", str(built / "tok"), "--workers", "1",
                 *SELECT]) == 0
    out = capsys.readouterr().out
    for word in (*DOMAINS, "train tokens", "bytes", "CC0-1.0", "PSF-2.0"):
        assert word in out
    assert out.rstrip().endswith("s)")


def test_missing_domain_is_skipped_with_a_warning(tmp_path, built, capsys, monkeypatch):
    monkeypatch.setenv("KINETIC_DATA_HOME", str(tmp_path / "empty"))
    args = ["--domains", "sotu,python_docs", "--source-root", f"python_docs={FIXTURE / 'python_docs'}"]
    assert main(["data", "build", "--out", str(tmp_path / "c"), "--tokenizer", str(built / "tok"),
                 "--workers", "1", *args]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping domain 'sotu'" in err and "install_data.sh sotu" in err
    assert json.loads((tmp_path / "c" / "index.json").read_text())["domains"].keys() == {"python_docs"}


@pytest.mark.parametrize("argv,message", [
    (["data", "build", "--out", "{tmp}/c", "--tokenizer", "{tmp}/none"], "no tokenizer at"),
    (["data", "build", "--out", "{tmp}/c", "--tokenizer", "{tok}", "--domains", "prose"],
     "unknown domain 'prose'"),
    (["tokenizer", "train", "--out", "{tmp}/t", "--vocab-size", "10"], "vocab_size=10 is too small"),
    (["tokenizer", "train", "--out", "{tmp}/t", "--val-fraction", "1.5"], "--val-fraction=1.5"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, built, capsys, monkeypatch):
    """Also on a machine without the optional corpora: the error comes before any skipped-domain
    warning."""
    monkeypatch.setenv("KINETIC_DATA_HOME", str(tmp_path / "empty"))
    argv = [a.format(tmp=tmp_path, tok=built / "tok") for a in argv]
    if argv[0] == "tokenizer":
        argv += ["--domains", "python_docs", "--source-root", f"python_docs={FIXTURE / 'python_docs'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith(f"kinetic {argv[0]} {argv[1]}: error:")


def test_register_into_a_parent_parser():
    parser = argparse.ArgumentParser(prog="kinetic")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "build", "--out", "c", "--tokenizer", "t",
                              "--max-bytes-per-domain", "2M"])
    assert args.command == "data" and args.max_bytes_per_domain == 2_000_000 and callable(args.func)
    args = parser.parse_args(["tokenizer", "train", "--out", "t"])
    assert args.vocab_size == 8192 and args.domains == "python_code,python_docs,sotu,metamath"


def test_parse_size():
    assert parse_size("2M") == 2_000_000 and parse_size("512KiB") == 524_288 and parse_size("1000") == 1000
    assert parse_size("1.5k") == 1500
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("two megabytes")
