"""The ``hyperadam`` command without the ``train`` extra: one line that says what to install."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from meta_train import cli

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_modules_checked_are_the_train_extras_distributions():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    names = [re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() for req in extras["train"]]
    assert tuple(names) == cli.TRAIN_EXTRA_MODULES  # each distribution imports under its name


@pytest.mark.parametrize("missing", [("torch",), ("ray", "mlflow")])
def test_a_missing_training_module_is_one_line_with_status_2(monkeypatch, capsys, missing):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # what find_spec reports as not installed
    code = cli.main(["evaluate", "--task", "mnist-nn-sigmoid-100", "--optimizer", "adam"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (
        f"hyperadam: error: the hyperadam command needs the training extra "
        f"({', '.join(missing)} not installed): pip install 'hyperadam[train]'\n"
    )


def test_help_works_without_the_training_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "meta-train" in capsys.readouterr().out
