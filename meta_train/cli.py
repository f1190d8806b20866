"""The ``hyperadam`` command line: one subcommand per job, each in ``meta_train/commands/``.

Subcommand modules are imported only when chosen, so ``hyperadam evaluate`` does not pay for Ray
or MLflow imports. A ``UsageError`` (bad configuration, unknown names, missing data) prints one
line ``hyperadam: error: …`` and exits with status 2 — no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from .errors import UsageError

# Import names of the ``train`` extra (pyproject.toml). ``pip install hyperadam`` is the runtime
# alone; every subcommand needs these, so a missing one is reported before anything is imported.
TRAIN_EXTRA_MODULES = ("torch", "ray", "mlflow", "onnx", "onnxscript", "matplotlib")
TRAIN_EXTRA_INSTALL = "pip install 'hyperadam[train]'"


def missing_train_modules() -> list[str]:
    """The ``train`` extra's modules that cannot be imported here (found, not imported)."""
    return [name for name in TRAIN_EXTRA_MODULES if importlib.util.find_spec(name) is None]


DESCRIPTION = (
    "HyperAdam, a learned optimizer: meta-train it on Ray (tracked in MLflow), evaluate it, "
    "export it to ONNX and register it."
)
EPILOG = "Run `hyperadam COMMAND --help` for the options of one command."

# subcommand → (module in meta_train.commands, one-line help)
SUBCOMMANDS = {
    "meta-train": ("meta_train_cmd", "meta-train a learned optimizer (Ray workers, MLflow run)"),
    "evaluate": ("evaluate_cmd", "evaluate an optimizer on a named test task"),
    "export": ("export_cmd", "export a trained optimizer to ONNX (and register it)"),
    "registry": ("registry_cmd", "list and promote registered optimizers"),
    "reproduce": ("reproduce_cmd", "run the paper's evaluation grid and write docs/results.md"),
    "benchmark": ("benchmark_cmd", "judge optimizers against tuned Adam on held-out tasks"),
    "lr-sweep": (
        "lr_sweep_cmd",
        "run an optimizer at multiples of its lr on the paper's 100-step rows (an oracle)",
    ),
    "snapshot-gate": (
        "snapshot_gate_cmd",
        "keep the newest meta-training snapshot that holds its start's long runs",
    ),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    # The module docstring is for developers; users get DESCRIPTION.
    parser = argparse.ArgumentParser(prog="hyperadam", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name == chosen:
            importlib.import_module(f"meta_train.commands.{module}").register(
                sub.add_parser(name, help=help_text, description=help_text)
            )
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    missing = missing_train_modules() if chosen in SUBCOMMANDS else []
    if missing:
        print(
            f"hyperadam: error: the hyperadam command needs the training extra "
            f"({', '.join(missing)} not installed): {TRAIN_EXTRA_INSTALL}",
            file=sys.stderr,
        )
        return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        print(f"hyperadam: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
