"""``kinetic data`` and ``kinetic tokenizer``: the data layer's jobs, registered by :func:`register`:

* ``kinetic data sources`` — which domains are installed here, their documents, bytes and licenses;
* ``kinetic tokenizer train --out DIR`` — a byte-level BPE trained on the train split of the chosen
  domains -> ``DIR/tokenizer.json`` and ``DIR/tokenizer_summary.json``;
* ``kinetic data build --out DIR --tokenizer DIR`` — tokenized, packed shards with a validation
  split -> ``DIR/index.json``, ``DIR/DOMAIN/*.bin`` and ``DIR/summary.json``.

Both jobs take the same selection flags (``--domains``, ``--max-bytes-per-domain``,
``--val-fraction``, ``--source-root``), so a tokenizer and a corpus made with the same flags see the
same documents and the tokenizer never sees validation text. A missing domain is skipped with a
warning; a mistake a user can make prints one line and exits with code 2. Bad flags and a missing
tokenizer are caught before the domains are scanned, so no skipped-domain warnings precede the error.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import warnings
from pathlib import Path

from kinetic.data.sources import SOURCES, SourceUnavailable, available, get_source
from kinetic.errors import UserError

SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KB": 10**3, "MB": 10**6, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# ---------------------------------------------------------------------- argument helpers
def parse_size(text: str) -> int:
    """'2M' -> 2_000_000, '512KiB' -> 524288, '1000' -> 1000 (K/M/G are decimal)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2000000, 500K, 2M or 1GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def _root(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not DOMAIN=PATH")
    return name, path


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domains", default=",".join(SOURCES),
                   help=f"comma-separated domains (default: all of {','.join(SOURCES)}; missing ones are "
                        "skipped with a warning)")
    p.add_argument("--max-bytes-per-domain", type=parse_size, default=None, metavar="SIZE",
                   help="cap each domain at SIZE bytes of text (e.g. 2M), a deterministic sample")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of each domain's bytes held out for validation (default 0.05)")
    p.add_argument("--source-root", type=_root, action="append", default=[], metavar="DOMAIN=PATH",
                   help="read DOMAIN from PATH instead of its installed location (repeatable)")


def _select_domains(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Known, installed domains from --domains (each missing one warned about and skipped); the
    flags are checked before the domains are scanned."""
    names = [n.strip() for n in args.domains.split(",") if n.strip()]
    roots = dict(args.source_root)
    try:
        for name in names + list(roots):
            get_source(name)
    except ValueError as err:
        raise UserError(str(err)) from None
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction={args.val_fraction} must be in [0, 1)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = available(names, roots)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if not found:
        raise UserError(f"none of the domains {names} is installed; run `bash scripts/install_data.sh` "
                            "or choose --domains from python_code,python_docs")
    return found, roots


def _versions() -> dict:
    import numpy
    import tokenizers

    import kinetic
    return {"kinetic": kinetic.__version__, "python": platform.python_version(),
            "tokenizers": tokenizers.__version__, "numpy": numpy.__version__}


def _write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps({**summary, "versions": _versions()}, indent=2) + "\n")


def _table(rows: list[list], header: list[str]) -> str:
    """Plain-text table: numbers right-aligned with thousands separators, text left-aligned."""
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(header))]
    cells = [header] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in
                               zip(r, widths, numeric, strict=True)).rstrip() for r in cells)


# ---------------------------------------------------------------------- commands
def cmd_sources(args: argparse.Namespace) -> int:
    rows, out = [], {}
    for name, source in SOURCES.items():
        try:
            docs = list(source.loader(None))
        except SourceUnavailable:
            rows.append([name, "missing", "-", "-", source.license, source.install or ""])
            out[name] = {"installed": False, "license": source.license, "install": source.install}
            continue
        size = sum(len(d.encode("utf-8")) for d in docs)
        rows.append([name, "yes", len(docs), size, source.license, source.description])
        out[name] = {"installed": True, "documents": len(docs), "bytes": size, "license": source.license}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(_table(rows, ["domain", "installed", "docs", "bytes", "license", "description / install"]))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from kinetic.data.pack import load_domain
    from kinetic.data.tokenizer import encode_batch, save_tokenizer, train_tokenizer

    domains, roots = _select_domains(args)
    start = time.perf_counter()
    splits = {d: load_domain(d, roots.get(d), args.max_bytes_per_domain, args.val_fraction) for d in domains}
    read_s = time.perf_counter() - start
    tok = train_tokenizer((doc for train, _ in splits.values() for doc in train), args.vocab_size,
                          min_frequency=args.min_frequency)
    path = save_tokenizer(tok, args.out)
    train_s = time.perf_counter() - start - read_s
    rows, stats = [], {}
    for d, (train, val) in splits.items():
        size = sum(len(x.encode("utf-8")) for x in train)
        held = sum(len(x.encode("utf-8")) for x in val)
        tokens = sum(map(len, encode_batch(tok, val)))
        stats[d] = {"train_documents": len(train), "train_bytes": size,
                    "val_bytes_per_token": round(held / tokens, 3) if tokens else None}
        rows.append([d, len(train), size, stats[d]["val_bytes_per_token"] or "-"])
    print(_table(rows, ["domain", "train docs", "train bytes", "val bytes/token"]))
    print(f"tokenizer  {path}  (vocab {tok.get_vocab_size():,}; read {read_s:.1f}s, train {train_s:.1f}s)")
    _write_summary(Path(args.out) / "tokenizer_summary.json", {
        "command": "tokenizer train", "vocab_size": tok.get_vocab_size(),
        "requested_vocab_size": args.vocab_size,
        "min_frequency": args.min_frequency, "max_bytes_per_domain": args.max_bytes_per_domain,
        "val_fraction": args.val_fraction, "domains": stats, "read_s": read_s, "train_s": train_s})
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from kinetic.data.pack import build_corpus
    from kinetic.data.tokenizer import load_tokenizer

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers={args.workers} must be >= 1")
    if args.shard_tokens < 1:
        raise UserError(f"--shard-tokens={args.shard_tokens} must be >= 1")
    load_tokenizer(args.tokenizer)  # a missing or bad tokenizer fails here, before the domain scan warns
    domains, roots = _select_domains(args)
    start = time.perf_counter()
    index = build_corpus(args.out, domains, args.tokenizer, max_bytes_per_domain=args.max_bytes_per_domain,
                         val_fraction=args.val_fraction, workers=args.workers, source_roots=roots,
                         shard_tokens=args.shard_tokens)
    seconds = time.perf_counter() - start
    rows = []
    for name, entry in index["domains"].items():
        tr, va = entry["train"], entry["val"]
        rows.append([name, entry["license"], tr["documents"], va["documents"], tr["bytes"] + va["bytes"],
                     tr["tokens"], va["tokens"]])
    header = ["domain", "license", "train docs", "val docs", "bytes", "train tokens", "val tokens"]
    print(_table(rows, header))
    total = sum(r[5] + r[6] for r in rows)
    print(f"corpus     {args.out}  ({total:,} {index['dtype']} tokens, vocab {index['vocab_size']:,}; "
          f"{seconds:.1f}s)")
    _write_summary(Path(args.out) / "summary.json", {
        "command": "data build", "tokenizer": str(args.tokenizer), "workers": args.workers,
        "seconds": seconds, "tokens": total, "domains": {r[0]: dict(zip(
            ["license", "train_documents", "val_documents", "bytes", "train_tokens", "val_tokens"], r[1:],
            strict=True)) for r in rows}})
    return 0


def _guarded(name: str, func):
    """Run ``func(args)``; user mistakes print one line and return 2, the exit code ``main`` raises."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (UserError, ValueError, OSError) as err:  # OSError: missing/unwritable paths
            print(f"kinetic {name}: error: {err}", file=sys.stderr)
            return 2
    return run


# ---------------------------------------------------------------------- registration
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data {sources,build}`` and ``tokenizer train`` to a ``kinetic`` subparsers object."""
    data = subparsers.add_parser("data", help="text corpora: list sources, build packed shards")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{sources,build}")
    p = data_sub.add_parser("sources", help="installed domains, their size and license")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_guarded("data sources", cmd_sources))

    p = data_sub.add_parser("build", help="tokenize domains into packed shards with a validation split")
    p.add_argument("--out", required=True, help="corpus directory (created; an earlier build is replaced)")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (or the file)")
    _add_selection_args(p)
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: in-process below 64 MB of text, else one per CPU)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.set_defaults(func=_guarded("data build", cmd_data_build))

    tok = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="{train}")
    p = tok_sub.add_parser("train", help="train on the domains' train split -> DIR/tokenizer.json")
    p.add_argument("--out", required=True, help="directory for tokenizer.json (e.g. a checkpoint directory)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. 256 bytes + specials")
    p.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a pair to merge")
    _add_selection_args(p)
    p.set_defaults(func=_guarded("tokenizer train", cmd_tokenizer_train))
