"""The repository's weight: trainer checkpoints stay out of git, and every one the docs name can be
found (in the tree, or at the commit the README gives for git history)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_PATH = re.compile(r"checkpoints/[\w.-]+\.(?:ckpt|npz)")
# README: "all of them are in the repository's history at commit `38f06a3`".
HISTORY_COMMIT = re.compile(r"in the repository's history at commit\s+`([0-9a-f]{7,40})`")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] + sorted(
        (ROOT / "docs" / "experiments").glob("*.json")
    )


def _named_checkpoints() -> dict[str, list[str]]:
    named: dict[str, list[str]] = {}
    for doc in _documents():
        for path in CHECKPOINT_PATH.findall(doc.read_text()):
            named.setdefault(path, []).append(doc.relative_to(ROOT).as_posix())
    return named


def _readme_table_files() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Trainer checkpoints\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([\w.-]+\.ckpt)`", section, flags=re.MULTILINE))


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _in_git_checkout() -> bool:
    return shutil.which("git") is not None and _git("rev-parse", "--git-dir").returncode == 0


def test_every_checkpoint_the_docs_name_is_in_the_tree_or_in_the_readme_table():
    table = _readme_table_files()
    missing = {
        path: docs
        for path, docs in _named_checkpoints().items()
        if not (ROOT / path).is_file() and Path(path).name not in table
    }
    assert not missing, f"named in the docs but neither in the tree nor in the README: {missing}"
    # θ files are the small inference artifact: experiments start from them, so they stay.
    for path in _named_checkpoints():
        if path.endswith(".npz"):
            assert (ROOT / path).is_file(), path


@pytest.mark.skipif(not _in_git_checkout(), reason="needs a git checkout with its history")
def test_the_checkpoints_out_of_the_tree_are_at_the_readme_commit_and_only_tests_keep_theirs():
    readme = (ROOT / "README.md").read_text()
    commit = HISTORY_COMMIT.search(readme)
    assert commit, "the README must name the commit that holds the trainer checkpoints"
    if _git("cat-file", "-e", f"{commit.group(1)}^{{commit}}").returncode != 0:
        pytest.skip(f"commit {commit.group(1)} is not in this clone (shallow?)")
    for name in _readme_table_files():
        blob = _git("cat-file", "-e", f"{commit.group(1)}:checkpoints/{name}")
        assert blob.returncode == 0, f"checkpoints/{name} is not at {commit.group(1)}"

    tracked = _git("ls-files", "checkpoints").stdout.split()
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    for path in tracked:
        if path.endswith(".ckpt"):
            assert Path(path).name in tests_text, f"{path} is tracked but no test reads it"
