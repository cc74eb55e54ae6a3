"""The README and the docs reference only files that are in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("examples/*/README.md")),
        ROOT / "tests" / "bench" / "README.md", ROOT / "data_src" / "README.md"]
TOP = ("saft_gx/", "tests/", "examples/", "docs/", "data_src/", "expectations/")
# a .md file name anywhere, or a path under one of the repository's top-level folders
# Paths the documented commands create (outputs, not sources).
GENERATED = {"examples/data_ci/gx/uncommitted/data_docs/local_site/index.html", "examples/saft_pipeline/output/"}
REF = re.compile(r"(?<![\w/.-])((?:\.\./)*[\w./-]+\.md|(?:%s)[\w./-]*[\w/])" % "|".join(map(re.escape, TOP)))


def _refs(doc: Path):
    for m in REF.finditer(doc.read_text(encoding="utf-8")):
        yield m.group(1).rstrip(".")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_referenced_files_exist(doc):
    missing = sorted({r for r in _refs(doc)
                      if r not in GENERATED and not (ROOT / r).exists() and not (doc.parent / r).exists() and "*" not in r})
    assert not missing, f"{doc.relative_to(ROOT)} references files not in the repository: {missing}"


def test_the_check_can_fail(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see GONE.md and ../outside/NOTES.md and `tests/bench/nope.py`, and `saft_gx/embedding/embed.py`")
    assert set(_refs(doc)) == {"GONE.md", "../outside/NOTES.md", "tests/bench/nope.py", "saft_gx/embedding/embed.py"}
