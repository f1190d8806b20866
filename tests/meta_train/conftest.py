"""Fixtures of the distributed meta-training tests: one Ray cluster per session.

Ray: the session's cluster is started by this process (``ray.init``, 4 logical CPUs so that a
killed driver's actors, released a moment later, never block the next test). In-process
learners use it directly; CLI subprocesses join it with ``--ray-address``. The MLflow fixtures
(``mlflow_template``, ``tracking_uri``, ``mlflow_server``) are in ``tests/conftest.py``.
"""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

@pytest.fixture(scope="session")
def ray_address():
    """Address of the session's Ray cluster (this process is connected to it)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def float64():
    """torch's default dtype is float64 for the test (finite-difference checks)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
