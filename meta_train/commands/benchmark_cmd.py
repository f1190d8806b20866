"""``hyperadam benchmark --suite heldout``: learned optimizers against tuned Adam on held-out tasks.

Writes ``generalisation.md``, ``generalisation.json`` (every number) and two figures into
``--out``, and logs them to MLflow. A second sitting with ``--merge`` keeps the earlier
report's Adam tunings and results and adds or reruns only the optimizers it names.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..errors import UsageError
from ._runtime_engine import runtime_exports
from ._threads import add_threads_flag, apply_threads

SUITES = ("heldout",)
DEFAULT_OPTIMIZERS = ("hyperadam", "rnnprop", "dm")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=SUITES, default="heldout")
    parser.add_argument(
        "--optimizer", nargs="+", default=list(DEFAULT_OPTIMIZERS), metavar="NAME|PATH",
        help="learned optimizers (built-in names, θ files or exported folders) judged against "
        "tuned Adam (default: hyperadam rnnprop dm)",
    )  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=(), help="task keys (default: all)")
    parser.add_argument(
        "--runs", type=int, default=None, help="evaluation runs (default 5; quick 2)"
    )
    parser.add_argument(
        "--tuning-runs", type=int, default=None, help="Adam tuning runs per lr (2; quick 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="short horizons: a smoke run")
    parser.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--out", default="docs", help="folder of the report (default docs)")
    parser.add_argument("--merge", action="store_true", help="keep an earlier report's cells")
    parser.add_argument(
        "--tracking-uri", default="sqlite:///mlflow.db",
        help="MLflow store for the report; 'none' to skip (default sqlite:///mlflow.db)",
    )  # fmt: skip
    parser.add_argument("--experiment", default="hyperadam-benchmark")
    parser.add_argument(
        "--engine", choices=("reference", "runtime"), default="reference",
        help="how learned optimizers step: the torch reference (default) or their exported "
        "ONNX step through the runtime (θ files are exported, parity-checked, to a private "
        "temporary folder; several times faster on large models)",
    )  # fmt: skip
    add_threads_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import QUICK_GRID, BenchmarkConfig, dumps, run_benchmark
    from ..benchmark_report import JSON_NAME, host_name, write_report
    from ..checkpoint import atomic_write_bytes
    from ..tasks.heldout import HELDOUT_KEYS

    apply_threads(args.threads)
    unknown = [t for t in args.tasks if t not in HELDOUT_KEYS]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(HELDOUT_KEYS)}")
    config_kwargs = {}
    if args.quick:
        config_kwargs["grid"] = QUICK_GRID
    config = BenchmarkConfig(
        optimizers=tuple(args.optimizer),
        tasks=tuple(args.tasks),
        runs=args.runs if args.runs is not None else (2 if args.quick else 5),
        tuning_runs=args.tuning_runs if args.tuning_runs is not None else (1 if args.quick else 2),
        seed=args.seed,
        quick=args.quick,
        jobs=args.jobs,
        engine=args.engine,
        **config_kwargs,
    )
    out = Path(args.out)
    partial = out / (JSON_NAME + ".partial")  # written after every task of a sitting
    previous = None
    if args.merge:
        # A stopped sitting's partial report holds everything the last complete one did.
        source = partial if partial.is_file() else out / JSON_NAME
        if source.is_file():
            try:
                previous = json.loads(source.read_text())
            except ValueError as error:
                raise UsageError(f"cannot merge into {source}: {error}") from None
            if previous.get("config", {}).get("quick") != config.quick:
                raise UsageError(f"--merge: {source} was written with another --quick")
    out.mkdir(parents=True, exist_ok=True)

    def save_partial(report: dict) -> None:
        atomic_write_bytes(partial, dumps(report).encode())  # a stop mid-write loses nothing

    with runtime_exports(
        config.optimizers, config.engine, flag="--optimizer", prefix="hyperadam-benchmark-"
    ) as folders:
        report = run_benchmark(
            config,
            previous,
            progress=lambda line: print(line, flush=True),
            on_task=save_partial,
            folders=folders,
        )
    report["host"] = host_name()
    command = "hyperadam " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    files = write_report(report, out, command)
    for label, o in sorted(report["summary"]["overall"].items()):
        print(
            f"{label}: IQM ratio {o['iqm_ratio']:.3f} [{o['iqm_ci'][0]:.3f}, {o['iqm_ci'][1]:.3f}]"
            f", ratio < 1 on {o['fraction_below_1'] * 100:.0f} % of {o['tasks']} tasks, "
            f"{o['unstable_runs']} unstable runs"
        )
    partial.unlink(missing_ok=True)
    print(f"wrote {files[0]} and {len(files) - 1} more files")
    if args.tracking_uri.lower() != "none":
        run_id = log_to_mlflow(args.tracking_uri, args.experiment, files, report)
        print(f"logged to MLflow run {run_id} ({args.tracking_uri})")
    return 0


def log_to_mlflow(uri: str, experiment: str, files: list[Path], report: dict) -> str:
    """One MLflow run: the config as params, IQM/fraction/per-task ratios as metrics, files."""
    import math

    from ..tracking import make_client

    client = make_client(uri)  # a fresh sqlite store is created under a lock
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    quick = report["config"]["quick"]
    run = client.create_run(experiment_id, run_name="heldout" + ("-quick" if quick else ""))
    run_id = run.info.run_id
    try:
        for key, value in report["config"].items():
            client.log_param(run_id, key, json.dumps(value))
        for label, o in report["summary"]["overall"].items():
            safe = label.replace("@", "_")
            if math.isfinite(o["iqm_ratio"]):
                client.log_metric(run_id, f"{safe}/iqm_ratio", o["iqm_ratio"])
            client.log_metric(run_id, f"{safe}/fraction_below_1", o["fraction_below_1"])
            client.log_metric(run_id, f"{safe}/unstable_runs", o["unstable_runs"])
        for key, cells in report["summary"]["per_task"].items():
            for label, c in cells.items():
                if math.isfinite(c["ratio"]):
                    client.log_metric(run_id, f"{label.replace('@', '_')}/ratio/{key}", c["ratio"])
        for path in files:
            client.log_artifact(run_id, str(path), "figures" if path.suffix == ".png" else None)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id
