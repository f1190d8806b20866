"""The ``--engine runtime`` exports of the evaluation commands (``benchmark``, ``reproduce``).

Under the runtime engine a learned optimizer steps through its exported ONNX step
(``meta_train.runtime_rule.ExportedRule``), so a θ file must be exported first. That export, and
its parity check against the torch reference, live here in the CLI layer: ``meta_train``'s core
may not import ``export`` (``tests/test_import_layers.py``), so the commands export and pass the
core a map from each θ-file source to its exported folder. Built-in names and exported folders
need no export (``meta_train.benchmark.runtime_folder``).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import UsageError


def export_theta_files(
    sources: Sequence[str], into: Path, *, flag: str = "--optimizer"
) -> dict[str, str]:
    """Exports every θ-file optimizer of ``sources`` under ``into`` (a private folder) for the
    runtime engine, each checked for parity against the torch reference as ``hyperadam export``
    does; baselines, built-in names and exported folders are run as they are.

    Returns ``{source: exported folder}``. A θ named twice (its file and its folder) is exported
    once. ``flag`` names the command-line option in the error a θ that cannot be exported gets.
    """
    from export import ParityError, export_optimizer
    from runtime.theta import load_theta, theta_path

    from ..benchmark import runtime_folder
    from ..resolve import BASELINES

    folders: dict[str, str] = {}
    exported: dict[Path, str] = {}  # θ file → its export
    for i, source in enumerate(sources):
        if source in BASELINES or runtime_folder(source) is not None:
            continue
        try:
            path = theta_path(source)
            if path.resolve() not in exported:
                folder = into / f"optimizer-{i}"
                export_optimizer(load_theta(path).method, path, folder)
                exported[path.resolve()] = str(folder)
        except (FileNotFoundError, ValueError, ParityError) as error:
            raise UsageError(f"{flag} {source}: cannot export it: {error}") from error
        folders[source] = exported[path.resolve()]
    return folders


@contextlib.contextmanager
def runtime_exports(
    sources: Sequence[str], engine: str, *, flag: str, prefix: str
) -> Iterator[dict[str, str]]:
    """``export_theta_files`` into a private temporary folder that lives as long as the block;
    no export (``{}``) under any engine but ``"runtime"``."""
    if engine != "runtime":
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as private:
        yield export_theta_files(sources, Path(private), flag=flag)
