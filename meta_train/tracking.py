"""MLflow tracking for meta-training: the only module that talks to MLflow (design §3.4).

``Tracker`` holds an explicit ``MlflowClient`` and run id (no fluent API, no active run). Params
are logged when the run is created, flattened, in batches of at most 100. Everything after that
(metrics, artifacts, tags, the final status) goes through a local *spool*: each operation is
appended to ``<spool>/ops.jsonl`` (artifacts are first hard-linked or copied under
``<spool>/files``) and a background thread delivers the operations in order, metrics with
``log_batch`` in batches of at most 1000. When the server is unreachable the thread keeps
retrying with backoff while training goes on; nothing is dropped, and a spool left by a killed
process is delivered when the run is resumed on the same machine. Redelivery is idempotent:
metrics carry their original timestamps (MLflow deduplicates identical rows) and artifacts
overwrite themselves.

A resumed run recomputes the steps after its last checkpoint; ``log_metrics`` skips every
(key, step) the run already holds (on the server or in the spool), so the run keeps ONE
continuous history per metric.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from mlflow import MlflowClient

MAX_PARAMS_PER_BATCH = 100  # MLflow log-batch limits
MAX_METRICS_PER_BATCH = 1000
OPS_FILE = "ops.jsonl"
DELIVERED_FILE = "delivered"
FILES_DIR = "files"


class TrackingError(RuntimeError):
    """The tracking store refused the run: unknown run id, unreachable at start, bad URI."""


SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, made absolute; None for other stores."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri[len(SQLITE_PREFIX) :].split("?", 1)[0]
    return Path(path).absolute() if path and path != ":memory:" else None


def absolute_store_uri(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute (``sqlite:///mlflow.db`` →
    ``sqlite:////here/mlflow.db``), so that every message names the real file."""
    path = sqlite_path(uri)
    if path is None or uri.startswith(SQLITE_PREFIX + "/"):
        return uri
    query = uri.partition("?")[2]
    return f"{SQLITE_PREFIX}{path}" + (f"?{query}" if query else "")


def require_store(uri: str) -> None:
    """Refuses a sqlite store whose file does not exist, before MLflow would create an empty one.

    Read-only commands (``registry list``, ``export --run``, ``--resume``) call this: looking
    something up must never leave an empty ``mlflow.db`` behind in the current folder.

    Raises:
      LookupError: the store's file is absent (the message names its absolute path).
    """
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise LookupError(
            f"no MLflow store at {path} ({uri}); pass --tracking-uri or set MLFLOW_TRACKING_URI "
            "to the store your runs are in"
        )


def make_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` for ``uri``; an unusable URI is a ``TrackingError`` (one line).

    A sqlite store is opened (created and migrated, if new) under an exclusive lock on its
    folder: processes that first touch a fresh store at once otherwise race through MLflow's
    schema migrations and all but one fail ("expected to match one row when updating").
    """
    from mlflow import MlflowClient

    try:
        path = sqlite_path(uri)
        if path is None or not path.parent.is_dir():
            return MlflowClient(tracking_uri=uri)
        with _folder_lock(path.parent):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # the store exists and is migrated
        return client
    except Exception as error:  # noqa: BLE001 - MLflow raises several types for a bad URI
        raise TrackingError(f"cannot open the MLflow store {uri}: {_one_line(error)}") from None


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a folder (no lock file is left behind); released on exit."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """Logs one MLflow run through a durable local spool.

    Use ``Tracker.start_run`` for a new run or ``Tracker.open_run`` to continue one; both start
    the delivery thread. Call ``close`` at the end.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        spool_root: str | Path,
        *,
        max_backoff_s: float = 5.0,
        stream: Any = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.spool = Path(spool_root) / run_id
        (self.spool / FILES_DIR).mkdir(parents=True, exist_ok=True)
        self.max_backoff_s = max_backoff_s
        self.stream = stream if stream is not None else sys.stderr
        self.last_error: str | None = None
        self.dropped: list[str] = []
        self._lock = threading.Condition()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._delivered = 0  # ops of ops.jsonl delivered so far
        self._seq = 0
        self._last_step: dict[str, int] = {}
        self._stop = False
        self._busy = False
        self._load_spool()
        self._ops_file = open(self.spool / OPS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._thread = threading.Thread(target=self._deliver_loop, name="mlflow-spool", daemon=True)
        self._thread.start()

    # -- opening a run ----------------------------------------------------------------------

    @classmethod
    def start_run(
        cls,
        uri: str,
        experiment: str,
        *,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        run_name: str | None,
        spool_root: str | Path,
        client: Any = None,
    ) -> Tracker:
        """Creates the run and logs its params (synchronously: the store must be reachable)."""
        from mlflow.entities import Param

        client = client or make_client(uri)
        try:
            experiment_id = get_or_create_experiment(client, experiment)
            run = client.create_run(experiment_id, tags=dict(tags), run_name=run_name)
            items = [Param(k, str(v)) for k, v in sorted(params.items())]
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                client.log_batch(run.info.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        except Exception as error:  # noqa: BLE001 - any failure here means: cannot track
            raise TrackingError(f"cannot create a run in {uri}: {_one_line(error)}") from None
        try:
            return cls(client, run.info.run_id, spool_root)
        except OSError as error:  # the spool folder: the run must not stay RUNNING
            mark_failed(client, run.info.run_id)
            raise TrackingError(
                f"run {run.info.run_id} failed: cannot write its spool under {spool_root}: "
                f"{_one_line(error)}"
            ) from None

    @classmethod
    def open_run(
        cls, uri: str, run_id: str, *, spool_root: str | Path, client: Any = None
    ) -> Tracker:
        """Continues an existing run: marks it RUNNING and learns which steps it holds."""
        client = client or make_client(uri)
        run = get_run(client, uri, run_id)
        last_steps = {}
        try:
            for key in run.data.metrics:
                history = client.get_metric_history(run_id, key)
                last_steps[key] = max((m.step for m in history), default=-1)
            client.update_run(run_id, status="RUNNING")
        except Exception as error:  # noqa: BLE001
            raise TrackingError(
                f"cannot reopen run {run_id} in {uri}: {_one_line(error)}"
            ) from None
        tracker = cls(client, run_id, spool_root)
        with tracker._lock:
            for key, step in last_steps.items():
                tracker._last_step[key] = max(step, tracker._last_step.get(key, -1))
        return tracker

    # -- logging (never blocks on the server) -----------------------------------------------

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Queues metrics at ``step``; keys the run already holds at this step are skipped."""
        ts = _now_ms()
        with self._lock:
            items = []
            for key, value in metrics.items():
                if step <= self._last_step.get(key, -1):
                    continue
                self._last_step[key] = step
                items.append([key, float(value), int(step), ts])
            if items:
                self._append({"op": "metrics", "metrics": items})

    def last_step(self, key: str) -> int:
        """The last step the run holds for ``key`` (-1 if none)."""
        with self._lock:
            return self._last_step.get(key, -1)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Queues a file; it is linked (or copied) into the spool first, so the caller may
        delete or rewrite it right away."""
        local_path = Path(local_path)
        with self._lock:
            target = self.spool / FILES_DIR / f"{self._seq:08d}" / local_path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(local_path, target)
            except OSError:
                shutil.copy2(local_path, target)
            rel = str(target.relative_to(self.spool))
            self._append({"op": "artifact", "file": rel, "artifact_path": artifact_path})

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                self.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Queues tags; values are logged as their ``str`` (MLflow tags are strings)."""
        with self._lock:
            self._append({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def pending(self) -> int:
        """Operations not yet delivered."""
        with self._lock:
            return len(self._queue)

    def flush(self, timeout: float) -> bool:
        """Waits until everything queued is delivered; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._lock.notify_all()
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
        return True

    def close(self, status: str = "FINISHED", timeout: float = 300.0) -> bool:
        """Queues the final status, waits up to ``timeout`` for delivery, stops the thread.

        Returns True when everything reached the server; otherwise the rest stays in the spool
        (``self.spool``) and is delivered when the run is reopened on this machine.
        """
        with self._lock:
            self._append({"op": "terminate", "status": status, "end_time": _now_ms()})
        done = self.flush(timeout)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():  # else it is stuck in a request; exit closes the file
            self._ops_file.close()
        return done

    # -- the spool --------------------------------------------------------------------------

    def _append(self, op: dict[str, Any]) -> None:
        # Caller holds the lock. One write per line: a killed process leaves at most a partial
        # last line, which _load_spool ignores.
        op["seq"] = self._seq
        self._seq += 1
        self._ops_file.write(json.dumps(op) + "\n")
        self._ops_file.flush()
        self._queue.append(op)
        self._lock.notify_all()

    def _load_spool(self) -> None:
        ops_path = self.spool / OPS_FILE
        delivered_path = self.spool / DELIVERED_FILE
        lines: list[str] = []
        if ops_path.exists():
            lines = ops_path.read_text(encoding="utf-8").split("\n")
            lines = [line for line in lines[:-1] if line]  # drop a partial last line
        delivered = int(delivered_path.read_text() or 0) if delivered_path.exists() else 0
        ops = []
        for line in lines:
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        # Rewrite the file with exactly the parsed ops, so line counts and offsets agree.
        atomic_write_bytes(ops_path, "".join(json.dumps(op) + "\n" for op in ops).encode())
        self._delivered = min(delivered, len(ops))
        for op in ops[self._delivered :]:
            self._queue.append(op)
            if op["op"] == "metrics":
                for key, _, step, _ in op["metrics"]:
                    self._last_step[key] = max(step, self._last_step.get(key, -1))
        self._seq = max((op.get("seq", -1) for op in ops), default=-1) + 1

    def _mark_delivered(self, count: int) -> None:
        # Caller holds the lock.
        for _ in range(count):
            op = self._queue.popleft()
            if op["op"] == "artifact":
                shutil.rmtree(self.spool / Path(op["file"]).parent, ignore_errors=True)
        self._delivered += count
        if not self._queue:
            # Compact: the counter first, then the file (a crash in between only redelivers).
            atomic_write_bytes(self.spool / DELIVERED_FILE, b"0")
            self._ops_file.seek(0)
            self._ops_file.truncate()
            self._delivered = 0
        else:
            atomic_write_bytes(self.spool / DELIVERED_FILE, str(self._delivered).encode())
        self._lock.notify_all()

    def _next_batch(self) -> tuple[str, list[dict[str, Any]]]:
        # Caller holds the lock: consecutive metric ops up to the batch limit, or one other op.
        first = self._queue[0]
        if first["op"] != "metrics":
            return first["op"], [first]
        batch: list[dict[str, Any]] = []
        count = 0
        for op in self._queue:
            if op["op"] != "metrics":
                break
            if batch and count + len(op["metrics"]) > MAX_METRICS_PER_BATCH:
                break
            batch.append(op)
            count += len(op["metrics"])
        return "metrics", batch

    def _deliver(self, kind: str, ops: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, RunTag

        if kind == "metrics":
            metrics = [Metric(k, v, ts, s) for op in ops for k, v, s, ts in op["metrics"]]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
        elif kind == "artifact":
            path = self.spool / ops[0]["file"]
            if path.exists():  # gone only if delivered before a crash
                self.client.log_artifact(self.run_id, str(path), ops[0]["artifact_path"])
        elif kind == "tags":
            self.client.log_batch(
                self.run_id, tags=[RunTag(k, v) for k, v in ops[0]["tags"].items()]
            )
        elif kind == "terminate":
            self.client.set_terminated(self.run_id, ops[0]["status"], ops[0]["end_time"])
        else:
            raise ValueError(f"unknown spool operation {kind!r}")

    def _deliver_loop(self) -> None:
        backoff = 0.5
        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                kind, ops = self._next_batch()
                self._busy = True
            try:
                self._deliver(kind, ops)
            except Exception as error:  # noqa: BLE001 - the server is away: keep, retry later
                with self._lock:
                    self._busy = False
                    if _is_client_error(error):
                        # The server answered and refused this op: retrying cannot help.
                        self.dropped.append(f"{kind}: {_one_line(error)}")
                        print(
                            f"hyperadam: warning: MLflow refused a {kind} operation: "
                            f"{_one_line(error)}",
                            file=self.stream,
                        )
                        self._mark_delivered(len(ops))
                        continue
                    self.last_error = _one_line(error)
                    # Sleep out the backoff even if new ops arrive meanwhile; stop ends it.
                    deadline = time.monotonic() + backoff
                    while not self._stop and (left := deadline - time.monotonic()) > 0:
                        self._lock.wait(left)
                    if self._stop:
                        return
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = 0.5
            with self._lock:
                self._busy = False
                self.last_error = None
                self._mark_delivered(len(ops))


def get_or_create_experiment(
    client: Any, name: str, *, attempts: int = 5, backoff_s: float = 0.2, **create: Any
) -> str:
    """The id of experiment ``name``, created if absent; safe when processes race to create it.

    Between "absent" and "create" another process may create it (sqlite then answers ``UNIQUE
    constraint failed``, a server ``RESOURCE_ALREADY_EXISTS``): a failed create is answered by
    looking the name up again, with a short backoff while the winner's transaction commits.
    ``create`` goes to ``create_experiment`` (e.g. ``artifact_location``).
    """
    error: Exception | None = None
    for attempt in range(attempts):
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, **create)
        except Exception as raised:  # noqa: BLE001 - the store's type for "exists" varies
            error = raised
            time.sleep(backoff_s * (attempt + 1))
    assert error is not None
    raise error


def get_run(client: Any, uri: str, run_id: str) -> Any:
    """``client.get_run`` with one-line errors: unknown id → LookupError, else TrackingError."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(error).lower():
            raise LookupError(f"unknown run id {run_id!r} in {uri}") from None
        raise TrackingError(f"cannot read run {run_id} from {uri}: {_one_line(error)}") from None
    except Exception as error:  # noqa: BLE001
        raise TrackingError(f"cannot read run {run_id} from {uri}: {_one_line(error)}") from None


def list_artifact_paths(client: Any, run_id: str, folder: str) -> list[str]:
    """The paths of the artifacts directly under ``folder`` of ``run_id`` (the store's errors
    propagate: the caller decides whether an unreachable store matters)."""
    return [info.path for info in client.list_artifacts(run_id, folder)]


def download_artifact(client: Any, run_id: str, path: str, dest: str | Path) -> Path:
    """Downloads artifact ``path`` of ``run_id`` into the folder ``dest``; returns the local
    path (the store's errors propagate)."""
    return Path(client.download_artifacts(run_id, path, str(dest)))


def experiment_id_of(client: Any, run_id: str) -> str:
    """The experiment ``run_id`` belongs to, or "?" when the store cannot say (for summaries)."""
    try:
        return client.get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - only ever shown, never acted on
        return "?"


def mark_failed(client: Any, run_id: str) -> None:
    """Best effort: ends ``run_id`` as FAILED (it must not stay RUNNING after a failed start)."""
    # The store may be away: the run's status is then all that is lost.
    with contextlib.suppress(Exception):
        client.set_terminated(run_id, "FAILED")


def _is_client_error(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status not in (404, 408, 429) and error.error_code not in (
        "TEMPORARILY_UNAVAILABLE",
        "ENDPOINT_NOT_FOUND",
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
