"""Test settings for the export tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_threaded_torch():
    """Tiny reference computations: torch threads only add contention on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
