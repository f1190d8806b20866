"""The packages depend one way: runtime ← meta_train ← export ← the CLI.

``runtime`` needs nothing of ours (users install it alone); ``meta_train``'s core uses only the
runtime's formats; ``export`` may use meta_train's cells and the runtime; only the CLI
(``meta_train/cli.py`` and ``meta_train/commands/``) uses everything. Every import is read with
``ast``, those inside functions included, so an import hidden in a function to dodge a cycle
fails here as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "meta_train", "export")

# layer → the layers it may import (its own always included).
ALLOWED = {
    "runtime": {"runtime"},
    "meta_train": {"meta_train", "runtime"},
    "export": {"export", "meta_train", "runtime"},
    "cli": {"cli", "export", "meta_train", "runtime"},
}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of ours, or None for a third-party module."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == "meta_train" and len(parts) > 1 and parts[1] in ("cli", "commands"):
        return "cli"
    return parts[0]


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, list[str]]]:
    """Per import statement in ``source``: its line and the dotted names it may load.

    ``from a.b import c`` may load the module ``a.b`` and, if ``c`` is a submodule, ``a.b.c``;
    relative imports are resolved against ``module``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, [target] + [f"{target}.{a.name}" for a in node.names]))
    return found


def violations(path: Path, source: str) -> list[str]:
    """Every import in ``source`` (the file at ``path``) that crosses the layers the wrong way."""
    relative = path.relative_to(ROOT).with_suffix("")
    is_package = relative.name == "__init__"
    module = ".".join(relative.parts[:-1] if is_package else relative.parts)
    own = layer_of(module)
    assert own is not None, module
    bad = []
    for line, names in imported_modules(source, module, is_package):
        for name in names:
            target = layer_of(name)
            if target is not None and target not in ALLOWED[own]:
                bad.append(f"{relative}.py:{line}: {own} imports {name} ({target})")
                break  # one report per statement
    return bad


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_import_runs_down_the_layers():
    bad = [v for path in source_files() for v in violations(path, path.read_text("utf-8"))]
    assert bad == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        (
            "meta_train/training.py",
            "def f():\n    from export.theta_io import load_theta\n",
            ["meta_train/training.py:2: meta_train imports export.theta_io (export)"],
        ),
        (
            "runtime/optimizer.py",
            "import meta_train.optimizers\n",
            ["runtime/optimizer.py:1: runtime imports meta_train.optimizers (meta_train)"],
        ),
        (
            "meta_train/tasks/suite.py",
            "from ..commands import evaluate_cmd\n",
            ["meta_train/tasks/suite.py:1: meta_train imports meta_train.commands (cli)"],
        ),
        (
            "export/parity.py",
            "from meta_train import cli\n",
            ["export/parity.py:1: export imports meta_train.cli (cli)"],
        ),
        ("export/parity.py", "from meta_train.optimizers import HyperAdam\n", []),
        ("meta_train/commands/export_cmd.py", "from export import export_optimizer\n", []),
        ("meta_train/training.py", "import numpy\nfrom runtime.theta import load_theta\n", []),
    ],
    ids=[
        "hidden-in-function",
        "runtime-up",
        "core-to-cli-relative",
        "export-to-cli",
        "export-down",
        "cli-anything",
        "core-to-runtime",
    ],
)
def test_the_checker_catches_imports_from_the_wrong_direction(path, source, expected):
    assert violations(ROOT / path, source) == expected
