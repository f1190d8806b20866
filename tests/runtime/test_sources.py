"""runtime.sources: what runtime.load accepts besides a folder."""

from __future__ import annotations

import re

import pytest

import runtime
from runtime import sources


def test_unknown_source_names_the_alternatives(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"is neither an exported optimizer folder, an "
        r"MLflow URI \(models:/, runs:/\) nor a built-in optimizer",
    ):
        runtime.load(str(tmp_path / "nothing"))


def test_mlflow_uris_go_through_the_lazy_hook(monkeypatch):
    seen = []
    monkeypatch.setattr(sources, "resolve_mlflow_uri", lambda uri: seen.append(uri) or "x")
    assert sources.resolve_source("models:/hyperadam@champion") == "x"
    assert seen == ["models:/hyperadam@champion"]


def test_builtin_names_resolve_to_the_package_folder(monkeypatch, hyperadam_folder):
    monkeypatch.setattr(sources, "BUILTIN_DIR", hyperadam_folder.parent)
    assert sources.resolve_source("hyperadam") == hyperadam_folder
    assert runtime.load("hyperadam").method == "hyperadam"


def test_a_builtin_name_means_the_builtin_even_beside_a_folder_of_that_name(
    monkeypatch, tmp_path, hyperadam_folder
):
    """Run from the parent of a clone named ``hyperadam``, ``load("hyperadam")`` is the built-in."""
    monkeypatch.setattr(sources, "BUILTIN_DIR", hyperadam_folder.parent)
    (tmp_path / "hyperadam").mkdir()  # e.g. the repository's checkout
    monkeypatch.chdir(tmp_path)
    assert sources.resolve_source("hyperadam") == hyperadam_folder
    assert runtime.load("hyperadam").method == "hyperadam"
    local = sources.resolve_source("./hyperadam")  # a path, not a name: the local folder
    assert local.resolve() == (tmp_path / "hyperadam").resolve()
@pytest.mark.parametrize(
    "uri, part",
    [
        ("runs:/0123/exported/../../../victim", ".."),
        ("runs:/../exported", ".."),
        ("runs:/0123/a//b", ""),
        ("runs:/0123/./a", "."),
        ("models:/..@candidate", ".."),
        ("models:/opt@..", ".."),
        ("runs:/0123/a\\..\\..\\victim", "a\\..\\..\\victim"),
    ],
)
def test_uri_parts_that_leave_the_cache_are_refused_before_anything_changes(
    tmp_path, uri, part
):
    from runtime.sources import download_mlflow_uri

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"has the part {re.escape(repr(part))}; each part must"):
        download_mlflow_uri(
            uri, cache_dir=tmp_path / "cache", tracking_uri=f"sqlite:///{tmp_path}/store.db"
        )
    assert (victim / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]  # no cache, no store
