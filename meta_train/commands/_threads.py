"""The ``--threads`` flag of the evaluation commands.

The test tasks are small (a 784-20-10 MLP, a 20-unit LSTM): each torch op takes microseconds,
so intra-op threads buy nothing, and on a machine whose other cores are busy (a meta-training
run, CI neighbours) they cost a lot: every op waits for a descheduled thread. Measured here with
a meta-training run on the other core: 20 steps of ``sin-lstm`` with Adam took 0.10 s on one
thread and 12.2 s on two. One thread is therefore the default.
"""

from __future__ import annotations

import argparse

from ..errors import UsageError


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; see docs)"
    )


def apply_threads(threads: int) -> None:
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
