"""Every "spec §N" / "design §N" in the code and the docs names a section of docs/spec.md or
docs/design.md that exists (and "§N.M.K" an item K of §N.M's numbered list, "§8 #K" a row of
§8's table), and the README points to those files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"spec": ROOT / "docs" / "spec.md", "design": ROOT / "docs" / "design.md"}
SOURCES = ("README.md", "docs", "meta_train", "export", "runtime", "tests", "benchmarks", "scripts")
SUFFIXES = {".py", ".md", ".cpp", ".toml", ".yaml", ".json", ""}

NUMBER = r"\d+(?:\.\d+)*"
# "spec §2.2", "Spec §2.4", "hyperadam-spec.md §2", "design §3.1", with "#K" after a section.
REFERENCE = re.compile(rf"\b(spec|design)(?:\.md)?\s*§\s*({NUMBER})((?:\s*#\d+)?)", re.IGNORECASE)
# What may follow a reference and continue it: ", §7", " and §7.2", " / §7", "–2.3", "–§5".
CONTINUATION = re.compile(rf"^(?:\s*(?:,|and|or|/)\s*§\s*|\s*[–-]\s*§?\s*)({NUMBER})((?:\s*#\d+)?)")
HEADING = re.compile(rf"^#{{2,3}}\s+({NUMBER})\.?\s", re.MULTILINE)


def _sections(text: str) -> dict[str, str]:
    """Section number → its text (up to the next heading of any level)."""
    marks = list(HEADING.finditer(text))
    return {
        m.group(1): text[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        for i, m in enumerate(marks)
    }


def _files() -> list[Path]:
    files = []
    for name in SOURCES:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [
            f
            for f in candidates
            if f.is_file()
            and f.suffix in SUFFIXES
            and "__pycache__" not in f.parts
            and f.name != Path(__file__).name  # its examples are the parser's own test
        ]
    return files


def references(text: str) -> list[tuple[str, str, str]]:
    """(document, section, row) for every reference in ``text``; row is "" or "#K"."""
    found = []
    for match in REFERENCE.finditer(text):
        doc = match.group(1).lower()
        found.append((doc, match.group(2), match.group(3).replace(" ", "")))
        rest = text[match.end() :]
        while more := CONTINUATION.match(rest):
            found.append((doc, more.group(1), more.group(2).replace(" ", "")))
            rest = rest[more.end() :]
    return found


def missing(doc_sections: dict[str, str], section: str, row: str) -> str | None:
    """Why ``section`` (with ``row``) is not in the document, or None if it is."""
    if section in doc_sections:
        body = doc_sections[section]
    else:  # §N.M.K: item K of §N.M's numbered list
        parent, _, item = section.rpartition(".")
        if parent not in doc_sections or "." not in parent:
            return f"no section {section}"
        if not re.search(rf"^{item}\. ", doc_sections[parent], re.MULTILINE):
            return f"§{parent} has no numbered item {item}"
        body = doc_sections[parent]
    if row and not re.search(rf"^\| {row[1:]} \|", body, re.MULTILINE):
        return f"§{section} has no table row {row}"
    return None


def test_the_reference_parser_reads_every_form_the_code_uses():
    text = (
        "(spec §3, §3.1, §7) Spec §2.4; hyperadam-spec.md §2; spec §2.2–2.3; spec §4–§5; "
        "spec §8 #14 accepts; spec §3.1 / §7; design §3.1 traps; spec §5, `--lr`; spec §3.1 and "
        "§7.2 use"
    )
    assert references(text) == [
        ("spec", "3", ""),
        ("spec", "3.1", ""),
        ("spec", "7", ""),
        ("spec", "2.4", ""),
        ("spec", "2", ""),
        ("spec", "2.2", ""),
        ("spec", "2.3", ""),
        ("spec", "4", ""),
        ("spec", "5", ""),
        ("spec", "8", "#14"),
        ("spec", "3.1", ""),
        ("spec", "7", ""),
        ("design", "3.1", ""),
        ("spec", "5", ""),
        ("spec", "3.1", ""),
        ("spec", "7.2", ""),
    ]
    sections = _sections("## 2. A\n### 2.2 B\n1. x\n3. y\n## 8. C\n| 14 | z |\n")
    assert missing(sections, "2.2", "") is None
    assert missing(sections, "2.2.3", "") is None
    assert missing(sections, "2.2.2", "") == "§2.2 has no numbered item 2"
    assert missing(sections, "8", "#14") is None
    assert missing(sections, "8", "#15") == "§8 has no table row #15"
    assert missing(sections, "9", "") == "no section 9"


def test_every_spec_and_design_reference_names_an_existing_section():
    sections = {doc: _sections(path.read_text()) for doc, path in DOCS.items()}
    broken, count = [], 0
    for path in _files():
        text = path.read_text(errors="replace")
        for doc, section, row in references(text):
            count += 1
            why = missing(sections[doc], section, row)
            if why:
                broken.append(f"{path.relative_to(ROOT)}: {doc} §{section}{row}: {why}")
    assert count > 100  # the code cites the documents throughout
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_each_document_says_what_its_references_mean(doc):
    head = DOCS[doc].read_text().split("\n## ", 1)[0]
    assert f'"{doc} §N' in head and "tests/test_docs.py" in head


def test_the_readme_points_to_the_documents_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "docs/spec.md" in readme and "docs/design.md" in readme
    assert "hyperadam-spec.md" not in readme
