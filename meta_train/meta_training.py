"""One meta-training run end to end: Ray learner + MLflow run + checkpoints + validation.

``start_run`` creates an MLflow run and trains; ``resume_run`` continues a run from its newest
valid checkpoint (local work folder or MLflow artifacts), after checking that the given config
matches the run's logged identity; ``continue_from_checkpoint`` continues a checkpoint file in a
new run (when the original tracking store is gone). All go through ``_Training``, whose methods
are the phases: each learner report goes to the tracker and the progress bar, then periodic
validation (best θ kept), periodic checkpoints and the plot; ``finish`` ends the run. MLflow is
reached only through ``tracking``. Ctrl-C (or SIGTERM) stops after the current step and writes a
checkpoint; a second Ctrl-C aborts at once.

Work folder layout (``<work_dir>/<run_id>/``): ``run_config.json``, ``checkpoints/``,
``theta/{best,final}/theta.npz``, ``plots/``; the tracker's spool is ``<work_dir>/spool/<run_id>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import checkpoint as ckpt_lib
from .checkpoint import BestTheta, Checkpoint, CheckpointError, History
from .errors import UsageError, os_error_line
from .learner import Learner, StepReport, check_state
from .plots import save_training_plot
from .progress import ProgressBar
from .ray_cluster import connect, resolve_workers
from .run_config import (
    RunConfig,
    config_digest,
    identity_mismatches,
    identity_params,
    merge,
)
from .tracking import (
    Tracker,
    TrackingError,
    download_artifact,
    experiment_id_of,
    get_run,
    list_artifact_paths,
    make_client,
    require_store,
)
from .validation import VALIDATION_BEST, Validator
from .worker import FaultInjection

# Validation may differ in a new run that continues a checkpoint file (it does not steer θ).
VALIDATION_PREFIX = "validation."
# Identity params that only decide how θ is validated; a continued run may change them.
VALIDATION_FREE = (VALIDATION_PREFIX, "experimental.validation_score")

CHECKPOINT_DIR = "checkpoints"  # local folder and MLflow artifact path
KEEP_LOCAL_CHECKPOINTS = 2
DERIVED_PARAMS = ("family_digest", "config_digest")


@dataclasses.dataclass(frozen=True)
class Options:
    """How and where to execute; none of this changes θ."""

    ray_address: str | None = None
    data_dir: str | None = None
    work_dir: Path = Path(".hyperadam")
    progress: bool = True
    stream: TextIO | None = None  # progress and notes (default: stderr)
    faults: FaultInjection | None = None  # test hook
    announce: Callable[[str], None] | None = None  # told the run id, as one line


@dataclasses.dataclass(frozen=True)
class RunSummary:
    run_id: str
    experiment_id: str
    tracking_uri: str
    step: int
    steps: int
    interrupted: bool
    delivered: bool  # everything reached the tracking server
    best: tuple[int, float] | None
    run_dir: Path
    spool: Path
    optimizer: str = "hyperadam"  # the method meta-trained


# -- entry points -----------------------------------------------------------------------------


def start_run(
    config: RunConfig, options: Options = Options(), checkpoint: Checkpoint | None = None
) -> RunSummary:
    """Creates an MLflow run for ``config`` and trains it (from ``checkpoint`` if given)."""
    family = config.make_family(options.data_dir)
    _check_family(family)
    if checkpoint is not None and checkpoint.family_digest not in ("", family.digest()):
        raise UsageError(
            f"the checkpoint was trained on task family {checkpoint.family_digest[:12]}…, "
            f"this config builds {family.digest()[:12]}…"
        )
    _check_work_dir(options.work_dir)
    try:
        client = make_client(config.tracking.uri)  # a bad URI is refused before Ray starts
    except TrackingError as error:
        raise UsageError(str(error)) from None
    with connect(options.ray_address) as cpus:
        config = resolve_workers(config, cpus, options.ray_address)
        if checkpoint is not None:
            _check_continuable(checkpoint, config)
        params = identity_params(config)
        params.update(family_digest=family.digest(), config_digest=config_digest(config))
        tags = _tags(config, family.digest())
        if checkpoint is not None:
            tags["hyperadam.continued_from_run"] = str(checkpoint.run_id)
            tags["hyperadam.continued_from_step"] = str(checkpoint.step)
        tracker = Tracker.start_run(
            config.tracking.uri,
            config.tracking.experiment,
            params=params,
            tags=tags,
            run_name=f"{config.optimizer}-{config.task}-seed{config.seed}",
            spool_root=options.work_dir / "spool",
            client=client,
        )
        with _failed_on_error(tracker, config):
            run_dir = options.work_dir / tracker.run_id
            _write_config(run_dir, config, family, tracker)
            if options.announce is not None:
                options.announce(
                    f"MLflow run {tracker.run_id} (experiment {config.tracking.experiment!r}, "
                    f"{config.tracking.uri})"
                )
        return _train(config, tracker, checkpoint, options, family.digest())


def continue_from_checkpoint(
    path: str | Path, overrides: Sequence[Mapping[str, Any]], options: Options = Options()
) -> RunSummary:
    """Continues a checkpoint file in a new MLflow run (e.g. one committed to the repository).

    ``--resume`` needs the run's tracking store; this needs only the file, which holds the
    whole trainer state and config. The new run is tagged with the run and step it continues,
    and θ evolves exactly as it would have in the original run.

    Raises:
      UsageError: an unreadable or altered checkpoint, or overrides that change the run's
        identity (the message names the fields).
    """
    try:
        checkpoint = ckpt_lib.load(path)
    except (OSError, CheckpointError) as error:
        raise UsageError(f"cannot continue from the checkpoint: {error}") from None
    config = _continued_config(
        checkpoint.config,
        overrides,
        identity_params(checkpoint.config),
        f"cannot continue from {path}: the config differs from the checkpoint's in ",
        free=VALIDATION_FREE,
    )
    config = dataclasses.replace(config, workers=_given_workers(overrides))
    checkpoint, restarted = validation_restarted(checkpoint, config)
    if options.announce is not None:
        options.announce(f"continuing {path} (run {checkpoint.run_id}, step {checkpoint.step})")
        if restarted:
            options.announce(
                "validation differs from the checkpoint's: the best θ and the validation curve "
                "start afresh in this run"
            )
    return start_run(config, options, checkpoint)


def validation_restarted(checkpoint: Checkpoint, config: RunConfig) -> tuple[Checkpoint, bool]:
    """The checkpoint to continue under ``config``'s validation, and whether that changed.

    Validation does not steer θ, so a new run may validate differently from the run it continues
    (e.g. on a held-out evaluation seed); but a best θ or a curve measured the old way cannot be
    compared with the new measurements, so both are dropped then.
    """
    saved = RunConfig.from_dict(checkpoint.config)
    if (saved.validation, saved.experimental.validation_score) == (
        config.validation,
        config.experimental.validation_score,
    ):
        return checkpoint, False
    history = dataclasses.replace(checkpoint.history, validation_steps=(), validation_loss=())
    return dataclasses.replace(checkpoint, history=history, best=None), True


def resume_run(
    run_id: str,
    overrides: Sequence[Mapping[str, Any]],
    tracking_uri: str,
    options: Options = Options(),
    *,
    restart: bool = False,
) -> RunSummary:
    """Continues ``run_id`` from its newest valid checkpoint, with ``overrides`` applied.

    ``restart`` allows starting the run again from step 0 when it has checkpoints but none of
    them verifies (otherwise that is an error).

    Raises:
      UsageError: no such store, unknown run id, no usable config, checkpoints of which none
        verifies, or a config that differs from the run's logged identity (the message names
        the fields).
    """
    try:
        require_store(tracking_uri)
        client = make_client(tracking_uri)
        run = get_run(client, tracking_uri, run_id)
    except (LookupError, TrackingError) as error:
        raise UsageError(str(error)) from None
    _check_work_dir(options.work_dir)
    run_dir = options.work_dir / run_id
    checkpoint = _newest_checkpoint(client, run_id, run_dir, options, restart=restart)
    if checkpoint is not None:
        logged_config = checkpoint.config
    else:
        logged_config = _logged_config(client, run_id, run_dir)
    logged = {k: v for k, v in run.data.params.items() if k not in DERIVED_PARAMS}
    config = _continued_config(
        logged_config,
        overrides,
        logged,
        f"cannot resume run {run_id}: the config differs from the run's in ",
    )
    family = config.make_family(options.data_dir)
    _check_family(family)
    with connect(options.ray_address) as cpus:
        given = dataclasses.replace(config, workers=_given_workers(overrides))
        config = resolve_workers(given, cpus, options.ray_address)
        if checkpoint is not None:
            _check_continuable(checkpoint, config)
        try:
            tracker = Tracker.open_run(
                tracking_uri, run_id, spool_root=options.work_dir / "spool", client=client
            )
        except (LookupError, TrackingError) as error:
            raise UsageError(str(error)) from None
        with _failed_on_error(tracker, config):
            tracker.set_tags(
                {"hyperadam.steps": config.steps, "hyperadam.workers": config.workers}
            )
            _write_local_config(run_dir, config)
            if options.announce is not None:
                start = checkpoint.step if checkpoint is not None else 0
                options.announce(f"MLflow run {run_id} resumed at step {start} ({tracking_uri})")
        return _train(config, tracker, checkpoint, options, family.digest())


def _without_unpinned_theta(layer: Mapping[str, Any]) -> Mapping[str, Any]:
    """``layer`` without an ``init.theta_sha256`` of None. None means "not pinned yet": a new
    run pins the starting θ file's digest (``build_config``), so the config file that started
    a run says None where the run's config says the digest, and must still resume it (the run
    continues from its checkpoint, not from that file)."""
    init = layer.get("init")
    if not isinstance(init, Mapping) or "theta_sha256" not in init or init["theta_sha256"]:
        return layer
    return {**layer, "init": {k: v for k, v in init.items() if k != "theta_sha256"}}


def _continued_config(
    saved: Mapping[str, Any],
    overrides: Sequence[Mapping[str, Any]],
    identity: Mapping[str, str],
    refusal: str,
    free: tuple[str, ...] = (),
) -> RunConfig:
    """The saved config with ``overrides`` on top, refused if they change its identity.

    Identity params starting with a prefix in ``free`` may change.
    """
    # The run's own config, complete: the optimizer's recipe is not applied again.
    merged = RunConfig.from_dict(saved).to_dict()
    for layer in overrides:
        merged = merge(merged, _without_unpinned_theta(layer))
    mismatches = [
        m
        for m in identity_mismatches(identity, merged)
        if not any(m.startswith(prefix) for prefix in free)
    ]
    if mismatches:
        raise UsageError(refusal + "; ".join(mismatches))
    try:
        return RunConfig.from_dict(merged)
    except ValueError as error:
        raise UsageError(str(error)) from None


# -- training ---------------------------------------------------------------------------------


def _train(
    config: RunConfig,
    tracker: Tracker,
    checkpoint: Checkpoint | None,
    options: Options,
    family_digest: str,
) -> RunSummary:
    return _Training(config, tracker, checkpoint, options, family_digest).run()


class _Training:
    """One pass of training, from a fresh start or a checkpoint, to the end or a stop.

    Owns what the phases share: the learner, the validator, the progress bar, the history of
    losses and the best θ. ``run`` drives the learner; after each update ``on_step`` logs it
    and runs the phases that are due (``validate``, ``write_checkpoint``); ``finish`` writes
    the final checkpoint, θ and plot and closes the MLflow run with the right status.
    """

    def __init__(
        self,
        config: RunConfig,
        tracker: Tracker,
        checkpoint: Checkpoint | None,
        options: Options,
        family_digest: str,
    ) -> None:
        self.config = config
        self.tracker = tracker
        self.family_digest = family_digest
        self.run_dir = options.work_dir / tracker.run_id
        self.history = checkpoint.history if checkpoint is not None else History()
        self.best = checkpoint.best if checkpoint is not None else None
        with _failed_on_error(tracker, config):
            self.learner = Learner(
                config,
                state=checkpoint.learner if checkpoint is not None else None,
                data_dir=options.data_dir,
                faults=options.faults,
            )
            self.optimizer = config.make_optimizer()
            self.validator = Validator(
                config.validation,
                self.optimizer,
                lr=config.unroll.lr,
                data_dir=options.data_dir,
                score=config.experimental.validation_score,
            )
        self.progress = ProgressBar(
            config.steps,
            start=self.learner.step,
            stream=options.stream if options.stream is not None else sys.stderr,
            enabled=options.progress,
        )
        if self.best is not None:
            self.progress.set_validation(self.history.validation_loss[-1], self.best.loss)
        self.lineage = {
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": config.tracking.uri,
            "task_digest": family_digest,
            "config_digest": config_digest(config),
        }

    # -- the phases --------------------------------------------------------------------------

    def write_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT_DIR / ckpt_lib.checkpoint_name(self.learner.step)
        ckpt_lib.save(
            path,
            Checkpoint(
                config=self.config.to_dict(),
                learner=self.learner.state(),
                history=self.history,
                best=self.best,
                run_id=self.tracker.run_id,
                family_digest=self.family_digest,
            ),
        )
        self.tracker.log_artifact(path, CHECKPOINT_DIR)
        _prune_local_checkpoints(path.parent)

    def write_plot(self) -> None:
        path = self.run_dir / "plots" / "meta_training.png"
        title = f"{self.config.optimizer} {self.tracker.run_id}"
        save_training_plot(path, self.history, title=title)
        self.tracker.log_artifact(path, "plots")

    def write_theta(self, which: str, step: int, theta: Any, **lineage: Any) -> None:
        """θ as ``theta/<which>/theta.npz``, locally and as an artifact."""
        path = ckpt_lib.save_theta(
            self.run_dir / "theta" / which / ckpt_lib.THETA_FILE,
            optimizer=self.optimizer,
            theta=theta,
            lr=self.config.unroll.lr,
            lineage={**self.lineage, "step": step, **lineage},
        )
        self.tracker.log_artifact(path, f"theta/{which}")

    def validate(self, step: int) -> None:
        result = self.validator(step, self.learner.theta_numpy())
        self.history = self.history.with_validation(step, result.score)
        if self.best is None or result.score < self.best.loss:
            self.best = BestTheta(step, result.score, self.learner.theta_numpy())
            self.write_theta("best", step, self.best.theta, validation_score=result.score)
        self.tracker.log_metrics(step, {**result.metrics(), VALIDATION_BEST: self.best.loss})
        self.progress.set_validation(result.score, self.best.loss)
        self.write_plot()

    def on_step(self, report: StepReport) -> None:
        step = report.step + 1  # θ version after this update
        self.tracker.log_metrics(report.step, report.metrics())
        self.history = self.history.with_step(report.step, report.meta_loss)
        if self.validator.due(step, self.config.steps):
            self.validate(step)
        self.progress.update(step, report.meta_loss, report.inner_steps)
        every = self.config.checkpoint_every
        if every and step % every == 0 and step < self.config.steps:
            self.write_checkpoint()

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> RunSummary:
        status, interrupted, aborted = "FINISHED", False, False
        with _stop_on_signals(self.progress) as stop:
            try:
                self.learner.start()
                self.learner.run(self.config.steps, self.on_step, should_stop=stop.is_set)
                interrupted = self.learner.step < self.config.steps
            except Exception:
                # Whatever stops the loop (a dead cluster, a full disk, a bug) ends the run
                # FAILED, never FINISHED or RUNNING; the committed state is still checkpointed.
                status = "FAILED"
                raise
            except KeyboardInterrupt:
                # A second Ctrl-C: the learner may be mid-update, so no checkpoint is written;
                # the last periodic one stays the resume point.
                status, aborted = "KILLED", True
                raise
            finally:
                delivered = self.finish(status, interrupted, aborted)
        return RunSummary(
            run_id=self.tracker.run_id,
            experiment_id=experiment_id_of(self.tracker.client, self.tracker.run_id),
            tracking_uri=self.config.tracking.uri,
            step=self.learner.step,
            steps=self.config.steps,
            interrupted=interrupted,
            delivered=delivered,
            best=None if self.best is None else (self.best.step, self.best.loss),
            run_dir=self.run_dir,
            spool=self.tracker.spool,
            optimizer=self.config.optimizer,
        )

    def finish(self, status: str, interrupted: bool, aborted: bool) -> bool:
        """Writes what the end of a run keeps, then closes the MLflow run; True if everything
        reached the tracking server."""
        self.progress.close()
        if interrupted:
            status = "KILLED"
            self.progress.note(f"interrupted at step {self.learner.step}: writing a checkpoint")
        try:
            if not aborted:
                self.write_checkpoint()
            if status == "FINISHED":
                self.write_theta("final", self.learner.step, self.learner.theta_numpy())
            if not aborted:
                self.write_plot()
            self.tracker.set_tags({"hyperadam.last_step": self.learner.step})
        except Exception:
            status = "FAILED"  # the final checkpoint, θ or plot could not be written
            raise
        finally:
            self.learner.close()
            delivered = _close_tracker(self.tracker, status, self.config, self.progress, aborted)
        return delivered


@contextlib.contextmanager
def _failed_on_error(tracker: Tracker, config: RunConfig) -> Iterator[None]:
    """Ends the run FAILED (KILLED on Ctrl-C) when the code inside raises, so that a run whose
    setup failed after MLflow created it never stays RUNNING; the error goes on to the caller."""
    try:
        yield
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        tracker.close(status, timeout=config.tracking.flush_timeout_s)
        raise


def _check_work_dir(work_dir: Path) -> None:
    """Creates the work folder up front: an unusable one is refused before any run exists."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot use --work-dir {work_dir}: {os_error_line(error)}") from None


def _check_continuable(checkpoint: Checkpoint, config: RunConfig) -> None:
    """Refuses, before a run is created or reopened, a checkpoint this config cannot continue."""
    try:
        check_state(config, checkpoint.learner)
    except ValueError as error:
        raise UsageError(
            f"cannot continue the checkpoint of step {checkpoint.step}: {error}"
        ) from None


def _close_tracker(
    tracker: Tracker, status: str, config: RunConfig, progress: Any, aborted: bool = False
) -> bool:
    if aborted:  # the spool keeps everything for the next --resume
        return tracker.close(status, timeout=2.0)
    pending = tracker.pending()
    if pending and tracker.last_error:
        progress.note(
            f"tracking server unreachable ({tracker.last_error}); waiting up to "
            f"{config.tracking.flush_timeout_s:.0f} s to deliver {pending} queued operations"
        )
    delivered = tracker.close(status, timeout=config.tracking.flush_timeout_s)
    if not delivered:
        progress.note(
            f"hyperadam: warning: {tracker.pending()} operations are still queued in "
            f"{tracker.spool}; `hyperadam meta-train --resume {tracker.run_id}` delivers them"
        )
    return delivered


# -- checkpoints and configs ------------------------------------------------------------------


def _newest_checkpoint(
    client: Any, run_id: str, run_dir: Path, options: Options, *, restart: bool = False
) -> Checkpoint | None:
    """The newest checkpoint of ``run_id`` that verifies, from the work folder or MLflow.

    Each step is tried locally first, then from MLflow, so a corrupted local copy of the newest
    step falls back to its MLflow copy before any older step. Broken copies are reported.

    Returns:
      The checkpoint, or None when the run has none (it stopped before its first one).

    Raises:
      UsageError: the run has checkpoints but none verifies, and ``restart`` is False
        (restarting from step 0 would silently throw away its progress).
    """
    local_dir = run_dir / CHECKPOINT_DIR
    sources: dict[int, list[tuple[str, Any]]] = {}
    if local_dir.is_dir():
        for path in local_dir.iterdir():
            step = ckpt_lib.step_of(path.name)
            if step is not None:
                sources.setdefault(step, []).append(("local", path))
    try:
        for artifact in list_artifact_paths(client, run_id, CHECKPOINT_DIR):
            step = ckpt_lib.step_of(Path(artifact).name)
            if step is not None:
                sources.setdefault(step, []).append(("mlflow", artifact))
    except Exception as error:  # noqa: BLE001 - the server may be away; local copies remain
        _note(options, f"hyperadam: warning: cannot list the run's checkpoints: {error}")
    for step in sorted(sources, reverse=True):
        for where, ref in sources[step]:
            try:
                loaded = _load_checkpoint_copy(client, run_id, run_dir, where, ref)
            except (CheckpointError, OSError) as error:
                _note(options, f"hyperadam: warning: skipping a bad checkpoint ({where}): {error}")
                continue
            if loaded.run_id not in (None, run_id):
                _note(options, f"hyperadam: warning: {ref} belongs to run {loaded.run_id}; skipped")
                continue
            return loaded
    if sources and not restart:
        raise UsageError(
            f"run {run_id} has {len(sources)} checkpoint step(s) but no copy verifies (local "
            f"{local_dir} or MLflow); --allow-restart starts it again from step 0"
        )
    return None


def _load_checkpoint_copy(
    client: Any, run_id: str, run_dir: Path, where: str, ref: Any
) -> Checkpoint:
    if where == "local":
        return ckpt_lib.load(ref)
    # Downloaded beside the local copies, never over them, and removed once read.
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=run_dir) as tmp:
        try:
            path = download_artifact(client, run_id, ref, tmp)
        except Exception as error:  # noqa: BLE001 - one store's failure is one bad copy
            raise CheckpointError(f"cannot download {ref}: {error}") from None
        return ckpt_lib.load(path)


def _logged_config(client: Any, run_id: str, run_dir: Path) -> dict[str, Any]:
    local = run_dir / "run_config.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        path = download_artifact(client, run_id, "config/run_config.json", run_dir)
        return json.loads(path.read_text())
    except Exception as error:  # noqa: BLE001
        raise UsageError(
            f"run {run_id} has neither a checkpoint nor config/run_config.json: {error}"
        ) from None


def _write_local_config(run_dir: Path, config: RunConfig) -> Path:
    path = run_dir / "run_config.json"
    ckpt_lib.atomic_write_bytes(path, json.dumps(config.to_dict(), indent=2).encode())
    return path


def _write_config(run_dir: Path, config: RunConfig, family: Any, tracker: Tracker) -> None:
    tracker.log_artifact(_write_local_config(run_dir, config), "config")
    family_path = run_dir / "family.json"
    ckpt_lib.atomic_write_bytes(family_path, json.dumps(family.to_dict(), indent=2).encode())
    tracker.log_artifact(family_path, "config")


def _prune_local_checkpoints(folder: Path) -> None:
    steps = sorted(
        (s, p) for p in folder.iterdir() if (s := ckpt_lib.step_of(p.name)) is not None
    )
    for _, path in steps[:-KEEP_LOCAL_CHECKPOINTS]:
        path.unlink(missing_ok=True)


def hardware_description() -> str:
    """The learner's machine in one line (the workers may be elsewhere: see the worker count)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()}"


def _tags(config: RunConfig, family_digest: str) -> dict[str, str]:
    return {
        "hyperadam.hardware": hardware_description(),
        "hyperadam.optimizer": config.optimizer,
        "hyperadam.task": config.task,
        "hyperadam.family_digest": family_digest,
        "hyperadam.config_digest": config_digest(config),
        "hyperadam.steps": str(config.steps),
        "hyperadam.workers": str(config.workers),
    }


def _given_workers(overrides: Sequence[Mapping[str, Any]]) -> int | None:
    merged: dict[str, Any] = {}
    for layer in overrides:
        merged = merge(merged, layer)
    return merged.get("workers")


def _check_family(family: Any) -> None:
    """Builds one task in the driver, so missing data is a one-line error, not a dead actor."""
    try:
        family.build(family.sample(0))
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error).splitlines()[0]) from None


def _note(options: Options, message: str) -> None:
    stream = options.stream if options.stream is not None else sys.stderr
    print(message, file=stream)


@contextlib.contextmanager
def _stop_on_signals(progress: ProgressBar) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set an event the learner polls; a second SIGINT raises at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        del frame
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        progress.note("stopping after the current step (Ctrl-C again to abort at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
