"""``hyperadam reproduce``: the paper's evaluation grid → results.md, PNGs, MLflow artifacts.

``--optimizers`` takes the paper's four by name and candidate θs by path (a θ file or a folder
holding ``theta.npz``); each candidate becomes a column of the report. ``--engine runtime`` runs
the candidates through their exported ONNX step: θ files are exported, parity-checked, into a
private temporary folder here (the core may not import ``export``), exported folders as they are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError
from ..paper import OPTIMIZERS
from ..reproduce import (
    QUICK_RUNS,
    ReproduceConfig,
    candidate_info,
    changed_optimizers,
    describe_candidate,
    drop_optimizers,
    is_candidate,
    merge_reports,
    replaced_candidates,
    resolve_optimizers,
    run_grid,
    write_report,
)
from ._runtime_engine import runtime_exports
from ._threads import add_threads_flag, apply_threads


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few runs of a few tasks")
    parser.add_argument("--tasks", nargs="+", default=(), help="task keys (default: whole grid)")
    parser.add_argument(
        "--optimizers", nargs="+", default=OPTIMIZERS, metavar="NAME|PATH",
        help=f"the paper's optimizers ({', '.join(OPTIMIZERS)}; default all) and candidate θ "
        "files or folders, each at its own default lr (a column NAME@DIGEST of the report)",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per cell (default 10; quick 2)"
    )
    parser.add_argument(
        "--long-runs", type=int, default=None,
        help="runs per cell for horizons of 2000+ steps (default: --runs)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells evaluated in parallel processes (default 1)"
    )
    parser.add_argument(
        "--merge", action="store_true",
        help="keep the cells of an existing results.json in --out that this run does not redo, "
        "and a learned optimizer's cells of the same θ on the same runs (not rerun)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="folder with CIFAR-10 python batches")
    parser.add_argument("--out", default="docs", help="folder for results.md (default docs)")
    parser.add_argument(
        "--tracking-uri",
        default="sqlite:///mlflow.db",
        help="MLflow store for the report artifacts; 'none' to skip (default sqlite:///mlflow.db)",
    )
    parser.add_argument("--experiment", default="hyperadam-reproduce")
    parser.add_argument(
        "--engine", choices=("reference", "runtime"), default="reference",
        help="how candidate θs step: the torch reference (default) or their exported ONNX step "
        "through the runtime (θ files are exported, parity-checked, to a private temporary "
        "folder; several times faster on large models; columns NAME@DIGEST/ort). The paper's "
        "four always run on the reference",
    )  # fmt: skip
    add_threads_flag(parser)
    parser.set_defaults(run=run)


def describe_optimizers(names: tuple[str, ...], candidates: dict[str, dict]) -> dict[str, str]:
    """How each shipped learned optimizer was trained, from its manifest's lineage; which θ
    each candidate is (``candidates``: label → ``candidate_info``)."""
    from ..resolve import LEARNED

    out = {}
    for name in names:
        if name in candidates:
            out[name] = describe_candidate(candidates[name])
            continue
        if name not in LEARNED:
            out[name] = "hand-designed; the paper's tuned learning rate per task (spec §5)"
            continue
        try:
            from runtime.sources import BUILTIN_DIR

            manifest = json.loads((BUILTIN_DIR / name / "manifest.json").read_text())
        except (FileNotFoundError, ValueError):
            out[name] = "not shipped yet"
            continue
        lineage = manifest.get("lineage") or {}
        out[name] = ", ".join(f"{k} {v}" for k, v in sorted(lineage.items()) if v is not None)
    return out


def log_to_mlflow(uri: str, experiment: str, files: list[Path], report: dict) -> str:
    from ..tracking import get_or_create_experiment, make_client

    client = make_client(uri)  # a fresh sqlite store is created under a lock
    experiment_id = get_or_create_experiment(client, experiment)
    run = client.create_run(
        experiment_id, run_name="reproduce" + ("-quick" if report["config"]["quick"] else "")
    )
    for key, value in report["config"].items():
        client.log_param(run.info.run_id, key, json.dumps(value))
    for path in files:
        client.log_artifact(
            run.info.run_id, str(path), "figures" if path.suffix == ".png" else None
        )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else 10)
    config = ReproduceConfig(
        tasks=tuple(args.tasks),
        optimizers=tuple(args.optimizers),
        runs=runs,
        seed=args.seed,
        data_dir=args.data_dir,
        quick=args.quick,
        long_runs=args.long_runs,
        jobs=args.jobs,
        engine=args.engine,
    )
    specs = resolve_optimizers(config.optimizers)  # a bad θ path fails here, before any cell
    previous = None
    if args.merge and (Path(args.out) / "results.json").is_file():
        try:
            previous = json.loads((Path(args.out) / "results.json").read_text())
        except ValueError as error:
            raise UsageError(f"cannot merge into {args.out}/results.json: {error}") from None
    paper = tuple(s.label for s in specs if not is_candidate(s.label))
    if previous is not None and (
        changed := changed_optimizers(previous, describe_optimizers(paper, {}))
    ):
        # Checked before any export or cell: a refused merge costs nothing and changes no file.
        raise UsageError(
            f"--merge: {', '.join(changed)} in {args.out}/results.json came from another θ than "
            "the one shipped now; one report holds one θ per optimizer (use another --out)"
        )
    with runtime_exports(
        config.optimizers, config.engine, flag="--optimizers", prefix="hyperadam-reproduce-"
    ) as folders:  # the exports live as long as the sitting's cells
        specs = resolve_optimizers(config.optimizers, engine=config.engine, folders=folders)
        candidates = {s.label: candidate_info(s) for s in specs if is_candidate(s.label)}
        described = describe_optimizers(tuple(s.label for s in specs), candidates)
        if previous is not None and (replaced := replaced_candidates(previous, specs)):
            for old, new in replaced.items():
                print(f"[reproduce] {old} replaced by {new}: the θ at its path changed")
            previous = drop_optimizers(previous, list(replaced))
        report = run_grid(config, previous=previous, folders=folders)
    report["optimizers"] = described
    if previous is not None:
        report = merge_reports(previous, report)
    files = write_report(report, config, Path(args.out))
    print(f"wrote {files[0]} and {len(files) - 1} more files")
    if args.tracking_uri.lower() != "none":
        run_id = log_to_mlflow(args.tracking_uri, args.experiment, files, report)
        print(f"logged to MLflow run {run_id} ({args.tracking_uri})")
    return 0
