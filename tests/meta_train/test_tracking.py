"""The MLflow tracker: batching limits, the spool across outages and restarts, deduplication."""

import threading

import pytest
from mlflow import MlflowClient

from meta_train.tracking import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, Tracker, get_run

EXPERIMENT = "hyperadam-tests"  # made by the tracking_uri fixture, artifacts under tmp_path


class RecordingClient:
    """A real client that records batch sizes and can be switched off (server away)."""

    def __init__(self, uri: str) -> None:
        self.inner = MlflowClient(tracking_uri=uri)
        self.down = False
        self.stalled = threading.Event()  # set: calls hang until ``resume`` is set
        self.resume = threading.Event()
        self.inside = threading.Event()  # set once a call is hanging inside the client
        self.calls: list[tuple[str, int, int]] = []  # (method, metrics, params)

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if name not in ("log_batch", "log_artifact", "set_terminated"):
            return attribute

        def call(*args, **kwargs):
            if self.stalled.is_set():  # a server that accepted the connection and hangs
                self.inside.set()
                self.resume.wait()
            if self.down:
                raise ConnectionError("server unreachable")
            self.calls.append(
                (name, len(kwargs.get("metrics", ())), len(kwargs.get("params", ())))
            )
            return attribute(*args, **kwargs)

        return call


def history(uri, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def new_tracker(uri, tmp_path, client, params=None):
    return Tracker.start_run(
        uri, EXPERIMENT, params=params or {"a": "1"}, tags={"t": "x"}, run_name="test",
        spool_root=tmp_path / "spool", client=client,
    )


def test_params_and_metrics_are_batched_within_mlflow_limits(tracking_uri, tmp_path):
    client = RecordingClient(tracking_uri)
    params = {f"group{i // 10}.p{i}": str(i) for i in range(250)}
    tracker = new_tracker(tracking_uri, tmp_path, client, params)
    for step in range(300):
        tracker.log_metrics(step, {f"k{j}": step + j / 10 for j in range(5)})
    assert tracker.close("FINISHED", timeout=60)
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert run.data.params == params and run.info.status == "FINISHED"
    assert history(tracking_uri, tracker.run_id, "k3") == [(s, s + 0.3) for s in range(300)]
    assert all(m <= MAX_METRICS_PER_BATCH and p <= MAX_PARAMS_PER_BATCH for _, m, p in client.calls)
    assert sum(p for _, _, p in client.calls) == 250
    assert sum(m for _, m, _ in client.calls) == 1500
    assert not (tracker.spool / "ops.jsonl").read_text()  # compacted once delivered


def test_an_outage_delays_delivery_but_loses_nothing(tracking_uri, tmp_path):
    client = RecordingClient(tracking_uri)
    tracker = new_tracker(tracking_uri, tmp_path, client)
    tracker.max_backoff_s = 0.2
    tracker.log_metrics(0, {"loss": 1.0})
    assert tracker.flush(30)
    client.down = True
    artifact = tmp_path / "step-00000001.ckpt"
    artifact.write_bytes(b"checkpoint bytes")
    for step in range(1, 6):
        tracker.log_metrics(step, {"loss": 1.0 / (step + 1)})
    tracker.log_artifact(artifact, "checkpoints")
    artifact.unlink()  # the spool holds its own link
    assert not tracker.flush(0.5)
    assert tracker.last_error is not None and "server unreachable" in tracker.last_error
    assert history(tracking_uri, tracker.run_id, "loss") == [(0, 1.0)]
    client.down = False
    assert tracker.close("FINISHED", timeout=30)
    assert [s for s, _ in history(tracking_uri, tracker.run_id, "loss")] == list(range(6))
    listed = MlflowClient(tracking_uri).list_artifacts(tracker.run_id, "checkpoints")
    files = [f.path for f in listed]
    assert files == ["checkpoints/step-00000001.ckpt"]


def test_a_spool_left_by_a_dead_process_is_delivered_on_reopen(tracking_uri, tmp_path):
    client = RecordingClient(tracking_uri)
    tracker = new_tracker(tracking_uri, tmp_path, client)
    for step in range(3):
        tracker.log_metrics(step, {"loss": float(step)})
    assert tracker.flush(30)
    client.down = True
    for step in range(3, 6):
        tracker.log_metrics(step, {"loss": float(step)})
    assert not tracker.close("KILLED", timeout=0.3)  # the process "dies" with a full spool
    # Simulate a partial last line from a kill mid-write.
    with open(tracker.spool / "ops.jsonl", "a") as f:
        f.write('{"op": "metr')

    reopened = Tracker.open_run(
        tracking_uri, tracker.run_id, spool_root=tmp_path / "spool",
        client=RecordingClient(tracking_uri),
    )
    assert reopened.last_step("loss") == 5  # from the server (0..2) and the spool (3..5)
    reopened.log_metrics(4, {"loss": 99.0})  # a recomputed step: skipped
    reopened.log_metrics(6, {"loss": 6.0})
    assert reopened.close("FINISHED", timeout=30)
    assert history(tracking_uri, tracker.run_id, "loss") == [(s, float(s)) for s in range(7)]


def test_reopen_skips_steps_the_server_already_holds(tracking_uri, tmp_path):
    tracker = new_tracker(tracking_uri, tmp_path, RecordingClient(tracking_uri))
    for step in range(5):
        tracker.log_metrics(step, {"loss": float(step), "other": 0.0})
    tracker.log_metrics(2, {"val": 1.0})
    assert tracker.close("KILLED", timeout=30)
    elsewhere = tmp_path / "elsewhere"  # another machine: no local spool
    reopened = Tracker.open_run(tracking_uri, tracker.run_id, spool_root=elsewhere)
    assert MlflowClient(tracking_uri).get_run(tracker.run_id).info.status == "RUNNING"
    for step in range(3, 8):
        reopened.log_metrics(step, {"loss": float(step)})
    reopened.log_metrics(2, {"val": 5.0})
    reopened.log_metrics(4, {"val": 2.0})
    assert reopened.close("FINISHED", timeout=30)
    assert history(tracking_uri, tracker.run_id, "loss") == [(s, float(s)) for s in range(8)]
    assert history(tracking_uri, tracker.run_id, "val") == [(2, 1.0), (4, 2.0)]


def test_unknown_run_id_is_a_lookup_error(tracking_uri):
    with pytest.raises(LookupError, match="unknown run id 'nope' in sqlite:///"):
        get_run(MlflowClient(tracking_uri), tracking_uri, "nope")


def test_delivery_does_not_block_logging(tracking_uri, tmp_path):
    """Logging only queues: with the delivery thread stuck inside a hanging server call, the
    training thread still logs everything (no timing: a logger that waited on the server would
    never finish here), and all of it arrives once the server answers."""
    client = RecordingClient(tracking_uri)
    tracker = new_tracker(tracking_uri, tmp_path, client)
    client.stalled.set()
    logger = threading.Thread(
        target=lambda: [tracker.log_metrics(step, {"loss": 0.5}) for step in range(200)]
    )
    logger.start()
    assert client.inside.wait(timeout=60)  # a call now hangs inside the client
    logger.join(timeout=60)  # a deadlock guard, not a speed limit
    assert not logger.is_alive() and not client.resume.is_set()
    assert tracker.pending() > 0
    client.stalled.clear()
    client.resume.set()
    assert tracker.close("FINISHED", timeout=60)
    assert [step for step, _ in history(tracking_uri, tracker.run_id, "loss")] == list(range(200))


class LosesTheRace:
    """A real client whose first lookup of the experiment is answered just before another
    process creates it (the window between check and create)."""

    def __init__(self, uri: str, name: str) -> None:
        self.inner = MlflowClient(tracking_uri=uri)
        self.other = MlflowClient(tracking_uri=uri)
        self.name = name
        self.raced = False

    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)

    def get_experiment_by_name(self, name):
        found = self.inner.get_experiment_by_name(name)
        if name == self.name and not self.raced:
            self.raced = True
            self.other.create_experiment(name)  # the other process wins
        return found


def test_a_run_in_a_new_experiment_survives_losing_the_creation_race(tracking_uri, tmp_path):
    client = LosesTheRace(tracking_uri, "brand-new")
    tracker = Tracker.start_run(
        tracking_uri, "brand-new", params={"a": "1"}, tags={}, run_name="racer",
        spool_root=tmp_path / "spool", client=client,
    )
    assert client.raced
    tracker.close()
    experiment = MlflowClient(tracking_uri).get_experiment_by_name("brand-new")
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "FINISHED"


def test_a_spool_that_cannot_be_written_ends_the_new_run_failed(tracking_uri, tmp_path):
    from meta_train.tracking import TrackingError

    client = MlflowClient(tracking_uri)
    with pytest.raises(TrackingError, match=r"failed: cannot write its spool under /proc/x/spool"):
        Tracker.start_run(tracking_uri, EXPERIMENT, params={}, tags={}, run_name="no-spool",
                          spool_root="/proc/x/spool", client=client)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"


def test_meta_training_calls_mlflow_only_through_tracking():
    """The run orchestration holds a client only to hand it to ``tracking``'s functions: no
    method of it is called there, and mlflow is not imported there."""
    import ast
    from pathlib import Path

    import meta_train.meta_training as module

    tree = ast.parse(Path(module.__file__).read_text("utf-8"))
    direct = [
        f"line {node.lineno}: .{node.func.attr}()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and (
            (isinstance(node.func.value, ast.Name) and node.func.value.id == "client")
            or (isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "client")
        )
    ]
    imports = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            (getattr(node, "module", None) or alias.name).startswith("mlflow")
            for alias in node.names
        )
    ]
    assert direct == [] and imports == []


def test_a_fresh_sqlite_store_is_created_under_a_lock_on_its_folder(tmp_path):
    """Processes that first open a fresh store at once would race through MLflow's migrations
    ("expected to match one row when updating"): the store is created under a folder lock."""
    import fcntl
    import os
    import threading

    from meta_train.tracking import make_client

    db = tmp_path / "mlflow.db"
    done = threading.Event()
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process creating the store holds this
    try:
        worker = threading.Thread(target=lambda: (make_client(f"sqlite:///{db}"), done.set()))
        worker.start()
        assert not done.wait(1.0)  # it waits for the lock ...
        assert not db.exists()  # ... before it touches the store
    finally:
        os.close(fd)
    worker.join(timeout=60)
    assert done.is_set() and db.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no lock file left
