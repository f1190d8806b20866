"""Worker processes of the ``--jobs`` pools (benchmark, reproduce) that do not outlive their parent.

A ``ProcessPoolExecutor`` worker only notices its parent is gone when it next reads the task
queue, so a sitting killed in the middle of a long run left workers computing for many minutes
and holding the CPUs a next sitting needed. Each worker watches its parent and exits with it.
"""

from __future__ import annotations

import os
import threading
import time

import torch

PARENT_POLL_SECONDS = 0.5


def init_worker(threads: int) -> None:
    """Pool initializer: ``threads`` torch threads, and exit when the parent process is gone."""
    torch.set_num_threads(threads)
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:  # a dead parent's children are re-parented
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()
