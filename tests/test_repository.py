"""The repository's open-source files: a licence, a citation file that parses, a linter pinned."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_the_code_is_mit_licensed():
    licence = (REPO / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Permission is hereby granted, free of charge" in licence
    assert "The code is MIT-licensed (LICENSE)" in (REPO / "README.md").read_text()


def test_citation_cff_is_valid_and_cites_teachers_and_data():
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors"):  # required by the CFF 1.2.0 schema
        assert citation[key], key
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    assert all("name" in a or "family-names" in a for a in citation["authors"])
    titles = " | ".join(r["title"] for r in citation["references"])
    for cited in ("ProtTrans", "antibody affinity maturation", "UniProt", "Observed Antibody Space"):
        assert cited in titles, cited
    for reference in citation["references"]:
        assert reference["type"] and reference["authors"] and reference["year"]


def test_the_linter_is_pinned_and_ci_runs_it_before_the_tests():
    assert any(line.startswith("ruff==") for line in (REPO / "requirements-dev.txt").read_text().splitlines())
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("ruff check") < ci.index("ruff format --check") < ci.index("pytest")
