"""``hyperadam snapshot-gate``: keep the newest meta-training snapshot that holds its start.

The gate itself is ``meta_train.snapshot_gate``; this command exports the θ files for the
runtime engine (the default: the step users install, and several times faster than the torch
reference on the 10 000-step gate tasks), writes the report and copies the kept snapshot. It
exits 1 when no snapshot passes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..errors import UsageError
from ._runtime_engine import runtime_exports
from ._threads import add_threads_flag, apply_threads


def register(parser: argparse.ArgumentParser) -> None:
    from ..snapshot_gate import DEFAULT_GATE_TASKS, DEFAULT_TOLERANCE, GateConfig

    parser.add_argument("--reference", required=True, metavar="PATH",
                        help="the θ file the arm started from")  # fmt: skip
    parser.add_argument("--snapshots", nargs="+", required=True, metavar="PATH",
                        help="θ files to gate (tried newest first, by their updates)")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_GATE_TASKS),
                        help="held-out or paper task keys (default: the fast subset's "
                        "10 000-step convex rows)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=GateConfig.runs)
    parser.add_argument("--seed", type=int, default=GateConfig.seed)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="a snapshot's mean final loss may be at most this × the "
                        "reference's (default 1.5)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the tasks' quick horizons")
    parser.add_argument("--engine", choices=("reference", "runtime"), default="runtime",
                        help="how θs step: their exported ONNX step (default) or the torch "
                        "reference")  # fmt: skip
    parser.add_argument("--keep", metavar="PATH", help="copy the kept snapshot here")
    parser.add_argument("--out", metavar="PATH", help="write the report (JSON) here")
    add_threads_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import dumps
    from ..snapshot_gate import GateConfig, gate_snapshots

    apply_threads(args.threads)
    try:
        config = GateConfig(tuple(args.tasks), args.runs, args.seed, args.tolerance, args.quick)
    except (KeyError, ValueError) as error:
        raise UsageError(str(error).strip("'\"")) from None
    sources = [args.reference, *args.snapshots]
    with runtime_exports(sources, args.engine, flag="--snapshots", prefix="hyperadam-gate-") as (
        folders
    ):
        try:
            report = gate_snapshots(args.snapshots, args.reference, config, folders=folders)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from None
    text = dumps(report)  # a diverged run's inf as null: strict JSON
    if args.out:
        Path(args.out).write_text(text)
    if args.keep and report["kept"] is not None:
        Path(args.keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report["kept"], args.keep)
    print(text)
    return 0 if report["kept"] is not None else 1
