"""The Ray side of a meta-training run: joining or starting a cluster, sizing the workers.

``connect`` refuses an unreachable address in seconds (Ray itself retries for minutes), starts a
private local cluster sized to the machine when no address is given, reuses a connection the
process already has (tests, notebooks), and shuts down only what it started.

Without an address the run never attaches to a cluster that happens to run on the machine (a
``ray start --head`` of the user's): Ray's plain ``ray.init()`` would join it, refuse our CPU
count and die, or share its CPUs with foreign work. ``--ray-address auto`` joins it on purpose.
The private cluster keeps Ray's default for a new local cluster (token authentication on, a
token generated in ``~/.ray/auth_token`` if there is none); the warning Ray prints on every start
to say it chose that is dropped, since there is nothing for the user to do about it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from .errors import UsageError
from .run_config import RunConfig

# Where Ray logs "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=…".
_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_DEFAULT_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropDefaultTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TOKEN_DEFAULT_NOTICE)


@contextlib.contextmanager
def _quiet_default_token_notice() -> Iterator[None]:
    """Drops Ray's notice that a new local cluster uses token authentication (only that one)."""
    logger, notice_filter = logging.getLogger(_TOKEN_SETUP_LOGGER), _DropDefaultTokenNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuses an address whose host:port does not accept TCP connections (Ray itself would
    retry for minutes)."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"Ray address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {error}") from None


@contextlib.contextmanager
def connect(address: str | None) -> Iterator[int]:
    """Connects to Ray (``address``, else ``$RAY_ADDRESS``, else a new private local cluster with
    one CPU per core of this machine); yields the cluster's CPU count; shuts down what it began."""
    import ray

    started = False
    if address is not None:
        check_ray_address(address)
    if not ray.is_initialized():  # else: a driver that already joined a cluster (tests, notebooks)
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address is None:
                with _quiet_default_token_notice():
                    ray.init(
                        address="local",  # a new private cluster, never one running here
                        num_cpus=os.cpu_count() or 1,
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level=logging.WARNING,
                    )
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as error:
            raise UsageError(f"cannot connect to Ray at {address}: {error}") from None
        started = True
    try:
        yield int(ray.cluster_resources().get("CPU", 1))
    finally:
        if started:
            ray.shutdown()


def resolve_workers(config: RunConfig, cpus: int, address: str | None) -> RunConfig:
    """Sizes workers/meta-batch to the cluster; a local cluster cannot host more workers than
    CPUs (an autoscaling one may add nodes, so there the start timeout decides)."""
    resolved = config.resolve(cpus)
    if address is None and resolved.workers > cpus:  # type: ignore[operator]
        raise UsageError(
            f"--workers {resolved.workers} exceeds the {cpus} CPUs of the local Ray cluster "
            "(each worker holds one CPU)"
        )
    return resolved
