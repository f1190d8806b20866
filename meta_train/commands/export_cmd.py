"""``hyperadam export``: a meta-training run's θ (or a θ file) → an exported folder, registered.

θ comes from the run's artifacts (``meta_training``'s layout): ``best`` is
``theta/best/theta.npz`` (the best validated θ), ``last`` the newest trainer checkpoint under
``checkpoints/``, a number the checkpoint of that meta-step. The folder is written by
``export.export_optimizer`` (parity checked), logged to the run, and registered as a new
version of ``--register NAME`` with the alias ``candidate``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UsageError, os_error_line

THETA_BEST = "theta/best/theta.npz"
EXPORTS_EXPERIMENT = "hyperadam-exports"  # runs that hold exports of local θ files


def register(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--run", dest="run_id", metavar="RUN_ID", help="MLflow run of `hyperadam meta-train`"
    )
    source.add_argument("--theta", metavar="FILE", help="a local θ file (theta.npz) instead")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="with --run: best (default: the best validated θ), last (newest checkpoint) or a "
        "meta-step number",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to create (absent "
                        "or empty)")
    parser.add_argument("--register", metavar="NAME", help="register a new version of NAME "
                        "with the alias 'candidate'")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default "
                        "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=EXPORTS_EXPERIMENT, help="with --theta and "
                        f"--register: experiment of the run that holds the export "
                        f"(default {EXPORTS_EXPERIMENT})")
    parser.add_argument("--full-parity", action="store_true", help="also check parity at 10^6 "
                        "coordinates (about 10 s more)")
    parser.set_defaults(run=run)


def tracking_uri(args: argparse.Namespace) -> str:
    from ..run_config import DEFAULT_TRACKING_URI
    from ..tracking import absolute_store_uri

    return absolute_store_uri(
        args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    )


def _check_args(args: argparse.Namespace) -> Path:
    if args.theta is not None and args.checkpoint is not None:
        raise UsageError("--checkpoint applies to --run; a --theta file is exported as it is")
    if args.checkpoint not in (None, "best", "last") and not args.checkpoint.isdigit():
        raise UsageError(f"--checkpoint must be best, last or a step, got {args.checkpoint!r}")
    if args.register is not None:
        from export.registry import check_model_name

        try:
            check_model_name(args.register)
        except ValueError as error:
            raise UsageError(f"--register: {error}") from None
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder")
    try:  # the folder is written beside its final place, then renamed: probe that now
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out.absolute().parent).cleanup()
    except OSError as error:
        raise UsageError(f"cannot write --out {out}: {os_error_line(error)}") from None
    if args.theta is not None and not Path(args.theta).is_file():
        raise UsageError(f"--theta {args.theta}: no such file")
    return out


def run(args: argparse.Namespace) -> int:
    out = _check_args(args)
    from export import ParityError, export_optimizer
    from export.exporter import DEFAULT_PARITY_SIZES, FULL_PARITY_SIZES
    from runtime.theta import load_theta

    uri = tracking_uri(args)
    client = None
    with tempfile.TemporaryDirectory(prefix="hyperadam-export-") as tmp:
        if args.run_id is not None:
            client, method, theta, lineage, lr = _theta_from_run(
                uri, args.run_id, args.checkpoint or "best", Path(tmp)
            )
        else:
            try:
                artifact = load_theta(args.theta)
            except ValueError as error:
                raise UsageError(str(error)) from None
            method, theta, lineage, lr = artifact.method, args.theta, None, None
        if lineage is not None:  # unknown keys stay as the θ file's meta has them
            lineage = {k: v for k, v in lineage.items() if v is not None}
        try:
            manifest = export_optimizer(
                method,
                theta,
                out,
                lineage=lineage,
                default_lr=lr,
                overwrite=out.exists(),  # only an empty folder gets here
                parity_sizes=FULL_PARITY_SIZES if args.full_parity else DEFAULT_PARITY_SIZES,
            )
        except ParityError as error:
            raise UsageError(f"export refused: {error}") from None
        except ValueError as error:
            raise UsageError(str(error)) from None
        except OSError as error:
            raise UsageError(f"cannot write --out {out}: {os_error_line(error)}") from None
    parity = manifest.parity["max_error"]
    print(
        f"exported {manifest.method} to {out}  (parity max error: step {parity['step']:.2e}, "
        f"trajectory {parity['trajectory']:.2e})"
    )
    if args.run_id is None and args.register is None:
        return 0
    from mlflow.exceptions import MlflowException

    from export import registry

    try:
        if client is None:
            client = registry.make_client(uri)
        run_id = args.run_id or _exports_run(client, uri, args.experiment, args.theta)
        logged = registry.log_exported(client, run_id, out)
        print(f"logged to {logged.uri}")
        if args.register is not None:
            version = registry.register(client, args.register, logged)
            print(
                f"registered {args.register} version {version.version} "
                f"(alias {registry.CANDIDATE}): models:/{args.register}@{registry.CANDIDATE}"
            )
    except (MlflowException, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise UsageError(
            f"{out} was exported but not logged/registered in {uri}: {first}"
        ) from None
    return 0


def _theta_from_run(
    uri: str, run_id: str, checkpoint: str, tmp: Path
) -> tuple[Any, str, Any, dict[str, Any], float | None]:
    """(client, method, θ, lineage, lr) of the chosen θ of run ``run_id``."""
    from ..tracking import TrackingError, get_run, make_client, require_store

    try:
        require_store(uri)  # reading a run must not create an empty store
        client = make_client(uri)
        mlflow_run = get_run(client, uri, run_id)
    except (LookupError, TrackingError) as error:
        raise UsageError(str(error)) from None
    params = mlflow_run.data.params
    lineage: dict[str, Any] = {
        "mlflow_run_id": run_id,
        "task_digest": params.get("family_digest"),
        "config_digest": params.get("config_digest"),
        "trainer": f"hyperadam meta-train ({params.get('optimizer', '?')}, seed "
        f"{params.get('seed', '?')}, {mlflow_run.data.tags.get('hyperadam.workers', '?')} "
        "workers)",
        "hardware": mlflow_run.data.tags.get("hyperadam.hardware"),
    }
    if checkpoint == "best":
        path = _download(client, run_id, THETA_BEST, tmp, "no best θ (theta/best/theta.npz): "
                         "the run has not validated yet; use --checkpoint last or a step")
        from runtime.theta import load_theta

        artifact = load_theta(path)
        step = artifact.meta.get("step")
        lineage.update(step=step, meta_updates=step, wall_time_s=_wall_time(client, run_id, step))
        _add_starting_theta(lineage, params)
        return client, artifact.method, path, lineage, artifact.meta.get("lr")
    exported = _theta_from_checkpoint(client, run_id, checkpoint, tmp, lineage)
    _add_starting_theta(lineage, params)
    return (client, *exported)


def _add_starting_theta(lineage: dict[str, Any], params: dict[str, str]) -> None:
    """A run that started at a trained θ (``init.kind = "theta"``) reports that θ's sha256 and,
    when its θ file is still the one the run started at, the cost of both runs together."""
    digest = params.get("init.theta_sha256")
    if params.get("init.kind") != "theta" or not digest:
        return
    lineage["started_from"] = digest
    from runtime.theta import load_theta, theta_path, theta_sha256

    try:
        start = load_theta(theta_path(params.get("init.theta", "")))
    except (OSError, ValueError):
        return  # gone: the digest alone records where the run started
    if theta_sha256(start.theta) != digest:
        return  # replaced since (e.g. a built-in re-shipped): its costs are another θ's
    for key in ("meta_updates", "wall_time_s"):
        before, now = start.meta.get(key), lineage.get(key)
        if isinstance(before, (int, float)) and isinstance(now, (int, float)):
            lineage[key] = before + now


def _theta_from_checkpoint(
    client: Any, run_id: str, checkpoint: str, tmp: Path, lineage: dict[str, Any]
) -> tuple[str, dict[str, Any], dict[str, Any], float | None]:
    import numpy as np
    import torch

    from .. import checkpoint as ckpt_lib
    from ..meta_training import CHECKPOINT_DIR
    from ..run_config import RunConfig

    try:
        listed = client.list_artifacts(run_id, CHECKPOINT_DIR)
    except Exception as error:  # noqa: BLE001 - one line, whatever the store says
        raise UsageError(f"cannot list the checkpoints of run {run_id}: {error}") from None
    steps = sorted(s for f in listed if (s := ckpt_lib.step_of(Path(f.path).name)) is not None)
    if not steps:
        raise UsageError(f"run {run_id} has no checkpoints under {CHECKPOINT_DIR}/")
    step = steps[-1] if checkpoint == "last" else int(checkpoint)
    if step not in steps:
        raise UsageError(
            f"run {run_id} has no checkpoint at step {step}; it has steps "
            f"{', '.join(map(str, steps))}"
        )
    name = f"{CHECKPOINT_DIR}/{ckpt_lib.checkpoint_name(step)}"
    path = _download(client, run_id, name, tmp, f"checkpoint {name} could not be downloaded")
    try:
        loaded = ckpt_lib.load(path)
        config = RunConfig.from_dict(loaded.config)
    except (ckpt_lib.CheckpointError, ValueError, TypeError) as error:
        raise UsageError(f"run {run_id}, {name}: {error}") from None
    optimizer = config.make_optimizer()
    theta = optimizer.unflatten(torch.from_numpy(np.asarray(loaded.learner.theta, np.float32)))
    lineage.update(
        step=loaded.step,
        meta_updates=loaded.step,
        wall_time_s=_wall_time(client, run_id, loaded.step),
        task_digest=loaded.family_digest or lineage["task_digest"],
    )
    return optimizer.name, theta, lineage, config.unroll.lr


def _wall_time(client: Any, run_id: str, step: Any) -> float | None:
    """Seconds from the run's start to its meta-loss at ``step`` (pauses between resumes count)."""
    try:
        start = client.get_run(run_id).info.start_time
        history = client.get_metric_history(run_id, "meta/loss")
    except Exception:  # noqa: BLE001 - lineage is best effort; the export itself goes on
        return None
    stamps = [m.timestamp for m in history if step is None or m.step < int(step)]
    if not stamps or start is None:
        return None
    return round((max(stamps) - start) / 1000.0, 1)


def _download(client: Any, run_id: str, path: str, tmp: Path, missing: str) -> Path:
    try:
        local = Path(client.download_artifacts(run_id, path, str(tmp)))
    except Exception:  # noqa: BLE001 - a missing artifact raises differently per store
        local = None
    if local is None or not local.is_file():
        raise UsageError(f"run {run_id}: {missing}")
    return local


def _exports_run(client: Any, uri: str, experiment: str, theta_file: str) -> str:
    """A run that holds the export of a local θ file (a registered version needs a run)."""
    from ..tracking import TrackingError, get_or_create_experiment

    try:
        experiment_id = get_or_create_experiment(client, experiment)
        run = client.create_run(
            experiment_id,
            run_name=f"export {Path(theta_file).name}",
            tags={"hyperadam.kind": "export", "hyperadam.theta_file": str(theta_file)},
        )
    except Exception as error:  # noqa: BLE001
        raise UsageError(str(TrackingError(f"cannot create a run in {uri}: {error}"))) from None
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
