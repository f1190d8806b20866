"""Fixtures shared by every test folder: MLflow stores (a sqlite template, a real server).

A migrated sqlite template is made once per session and copied per test (a fresh database costs
seconds of migrations); ``mlflow_server`` runs a real ``mlflow server`` on 127.0.0.1 (sqlite
backend, proxied artifacts under the test's tmp_path) that a test can stop and restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
EXPERIMENT = "hyperadam-tests"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # runs the migrations
    return path


@pytest.fixture
def tracking_uri(mlflow_template, tmp_path, monkeypatch):
    """A fresh sqlite store whose experiment keeps its artifacts under tmp_path."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    uri = f"sqlite:///{db}"
    MlflowClient(tracking_uri=uri).create_experiment(
        EXPERIMENT, artifact_location=str(tmp_path / "artifacts")
    )
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) that can be stopped."""

    def __init__(self, root: Path, db: Path) -> None:
        self.root = root
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"), "server",
                "--backend-store-uri", f"sqlite:///{self.db}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends exactly it
            # No job-runner consumers (7 extra processes that slow the start on a busy machine).
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                break
        self.stop()  # a server that did not come up must not outlive the test
        raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


@pytest.fixture
def mlflow_server(mlflow_template, tmp_path):
    db = tmp_path / "server.db"
    shutil.copy(mlflow_template, db)
    server = MlflowServer(tmp_path, db)
    server.start()
    yield server
    server.stop()
