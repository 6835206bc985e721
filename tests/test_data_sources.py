"""Text sources: the committed fixture read through the real loaders, metamath proof stripping, and
missing domains skipped with a warning instead of a crash."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kinetic.data import sources
from kinetic.data.sources import SOURCES, SourceUnavailable, available, iter_documents, strip_metamath_proofs

FIXTURE = Path(__file__).parent / "fixtures" / "data"


def test_fixture_is_small_and_documented():
    files = [p for p in FIXTURE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 300_000
    readme = (FIXTURE / "README.md").read_text()
    for name in ("sotu", "python_code", "python_docs", "metamath"):
        assert (FIXTURE / name).is_dir() and f"`{name}/" in readme


@pytest.mark.parametrize("name,count",
                         [("sotu", 6), ("python_code", 7), ("python_docs", 18), ("metamath", 8)])
def test_fixture_domains_load_in_a_stable_order(name, count):
    docs = list(iter_documents(name, FIXTURE / name))
    assert len(docs) == count
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert docs == list(iter_documents(name, FIXTURE / name))


def test_sotu_is_in_year_order():
    docs = list(iter_documents("sotu", FIXTURE / "sotu"))
    assert docs[0].startswith("Fellow-Citizens of the Senate and House of Representatives")  # 1790


def test_python_code_skips_tests_caches_and_generated_codecs(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "tests" / "test_mod.py").write_text("assert True\n")
    (tmp_path / "test" / "test_x.py").write_text("assert True\n")
    (tmp_path / "cp999.py").write_text('""" Python Character Mapping Codec cp999 generated from X\n"""\n')
    (tmp_path / "empty.py").write_text("\n")
    assert list(iter_documents("python_code", tmp_path)) == ["x = 1\n"]


def test_python_docs_default_reads_pydoc_topics():
    docs = list(iter_documents("python_docs"))
    assert len(docs) > 50 and any("assert_stmt" in d or "assert" in d for d in docs)


def test_strip_metamath_proofs_keeps_statements_and_comments():
    text = ("$( A comment mentioning $= inside. $)\n"
            "  con4 $p |- ( ( -. ph -> -. ps ) -> ( ps -> ph ) ) $=\n    ( ax-3 ) ABC $.\n"
            "  ax-mp $a |- ps $.\n")
    assert strip_metamath_proofs(text) == ("$( A comment mentioning $= inside. $)\n"
                                           "  con4 $p |- ( ( -. ph -> -. ps ) -> ( ps -> ph ) ) $.\n"
                                           "  ax-mp $a |- ps $.\n")


def test_metamath_fixture_has_no_proofs_and_splits_at_section_headers():
    docs = list(iter_documents("metamath", FIXTURE / "metamath"))
    text = "".join(docs)
    assert "$=" not in re.sub(r"\$\(.*?\$\)", "", text, flags=re.DOTALL)  # comments may mention it
    assert "( ax-3 ) ABC $." not in text  # the compressed proof of con4
    assert "con4 $p |- ( ( -. ph -> -. ps ) -> ( ps -> ph ) ) $." in text
    assert all(d.startswith("$(\n") for d in docs[1:])
    assert any("Logical negation" in d.split("\n")[2] for d in docs)


def test_unknown_domain_names_the_choices():
    with pytest.raises(ValueError, match="'prose'.*python_code, python_docs, sotu, metamath"):
        iter_documents("prose")


def test_missing_domain_is_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("KINETIC_DATA_HOME", str(tmp_path))
    monkeypatch.setattr(sources, "METAMATH_SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(SourceUnavailable, match="domain 'sotu' is not installed.*install_data.sh sotu"):
        iter_documents("sotu")
    with pytest.warns(UserWarning) as record:
        found = available(["python_docs", "sotu", "metamath"])
    assert found == ["python_docs"]
    messages = [str(w.message) for w in record]
    assert any("'sotu'" in m and "install_data.sh sotu" in m for m in messages)
    assert any("'metamath'" in m and "metamath-databases" in m for m in messages)


def test_every_source_has_license_and_description():
    for source in SOURCES.values():
        assert source.license and source.description and callable(source.loader)
