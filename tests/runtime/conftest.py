"""Exported folders shared by the runtime tests (one small export per method and session)."""

from __future__ import annotations

import pytest
import torch

from export import export_optimizer
from meta_train.optimizers import make_learned_optimizer
from meta_train.seeding import generator

METHODS = ("hyperadam", "dm", "rnnprop")


def theta_for(method: str, seed: int = 0) -> dict:
    return make_learned_optimizer(method).init_theta(generator(seed))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """method → folder; parity kept small here (tests/export runs the full check)."""
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for method in METHODS:
        folders[method] = root / method
        export_optimizer(
            method, theta_for(method), folders[method], parity_sizes=(2,), trajectory_steps=3
        )
    return folders


@pytest.fixture(scope="session")
def hyperadam_folder(exported):
    return exported["hyperadam"]


@pytest.fixture(autouse=True)
def single_threaded_torch():
    """Tiny reference computations: torch threads only add contention on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
