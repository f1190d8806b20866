"""``hyperadam lr-sweep``: an optimizer at multiples of its lr on the paper's 100-step rows.

The sweep is ``meta_train.lr_sweep``; this command validates the arguments before anything runs,
exports a θ file for the runtime engine (``--engine runtime``: its exported ONNX step, several
times faster than the torch reference), prints the table and writes the whole result as JSON.
``--table FILE…`` runs nothing: it renders earlier sweeps' JSON files as one table
(``merge_tables``), refusing files that are not the same runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError
from ._runtime_engine import runtime_exports
from ._threads import add_threads_flag, apply_threads


def register(parser: argparse.ArgumentParser) -> None:
    from ..lr_sweep import DEFAULT_MULTIPLIERS

    parser.add_argument(
        "--optimizer", default="adam", help="a baseline, a built-in or a θ file/folder"
    )
    parser.add_argument(
        "--multipliers", type=float, nargs="+", default=DEFAULT_MULTIPLIERS,
        help="multiples of the optimizer's own lr (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=(), help="100-step paper rows (default all)")
    parser.add_argument("--engine", choices=("reference", "runtime"), default="reference",
                        help="how a learned optimizer steps: the torch reference (default) or "
                        "its exported ONNX step; Adam steps in torch either way")  # fmt: skip
    parser.add_argument("--out", metavar="PATH", help="write the whole result as JSON here")
    parser.add_argument("--table", nargs="+", metavar="FILE",
                        help="run nothing: print earlier sweeps' JSON files (--out) as one table; "
                        "they must be the same runs")  # fmt: skip
    add_threads_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import runtime_source
    from ..lr_sweep import SweepConfig, default_lr, format_table, hundred_step_rows, sweep
    from ..resolve import BASELINES

    if args.table:
        return _table(args)
    apply_threads(args.threads)
    try:
        config = SweepConfig(args.optimizer, tuple(args.multipliers), args.runs, args.seed,
                             tuple(args.tasks))  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from None
    default_lr(config.optimizer, next(iter(config.tasks or hundred_step_rows())))  # known?
    with runtime_exports(
        [config.optimizer], args.engine, flag="--optimizer", prefix="hyperadam-lr-sweep-"
    ) as folders:
        folder = None  # the torch reference, and always for a baseline
        if args.engine == "runtime" and config.optimizer not in BASELINES:
            folder = runtime_source(config.optimizer, folders, flag="--optimizer")
        result = sweep(config, folder=folder)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


_RUN_FLAGS = ("optimizer", "multipliers", "runs", "seed", "tasks", "engine", "out")


def _table(args: argparse.Namespace) -> int:
    from ..lr_sweep import merge_tables

    defaults = _defaults()
    given = [f"--{name}" for name in _RUN_FLAGS if getattr(args, name) != defaults[name]]
    if given:
        raise UsageError(f"--table runs nothing, so it takes no {', '.join(given)}")
    results = []
    for name in args.table:
        path = Path(name)
        try:
            result = json.loads(path.read_text())
            keys_present = {"config", "engine", "rows"} <= set(result) and all(
                key in result["config"] for key in ("optimizer", "runs", "seed")
            )
        except (OSError, ValueError, TypeError) as error:
            raise UsageError(f"--table: cannot read {name}: {error}") from None
        if not keys_present:
            raise UsageError(f"--table: {name} is not a sweep's JSON (hyperadam lr-sweep --out)")
        results.append((name, result))
    try:
        print(merge_tables(results))
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--table: {error}") from None
    return 0


def _defaults() -> dict[str, object]:
    parser = argparse.ArgumentParser()
    register(parser)
    return {name: parser.get_default(name) for name in _RUN_FLAGS}
