"""Subnormals as zero inside the runtime's steps, and only there (runtime/subnormals.py)."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

import runtime
from runtime import subnormals

pytestmark = pytest.mark.skipif(
    not subnormals.SUPPORTED, reason="the flush needs glibc on x86-64; elsewhere it is a no-op"
)
TINY = np.float32(1e-39)  # subnormal in float32


def flushes_here() -> bool:
    """True if this thread currently treats subnormals as zero."""
    return float((np.array([TINY]) * np.float32(1.0))[0]) == 0.0


def test_the_flush_lasts_for_the_block_in_its_own_thread_only():
    # The other thread starts outside the block (a new thread inherits its creator's mode).
    inside, checked, seen_elsewhere = threading.Event(), threading.Event(), []

    def other_thread() -> None:
        inside.wait(10)
        seen_elsewhere.append(flushes_here())
        checked.set()

    other = threading.Thread(target=other_thread)
    other.start()
    with subnormals.flush_subnormals():
        assert flushes_here()
        inside.set()
        checked.wait(10)
    other.join()
    assert seen_elsewhere == [False]
    assert not flushes_here()


def test_preserved_float_mode_undoes_whatever_the_block_set():
    """As onnxruntime's first session does: the block sets FTZ/DAZ and never restores it."""
    with subnormals.preserved_float_mode():
        flushed = subnormals.flush_subnormals()
        flushed.__enter__()  # left open on purpose: nothing inside the block restores the mode
        assert flushes_here()
    assert not flushes_here()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_stalled_state_steps_without_subnormals_and_leaves_the_caller_alone(exported, threads):
    """From moments decayed into the subnormal range and a zero gradient, the new state holds
    no subnormals (without the flush, m·β and v·β stay subnormal: an 8-14x slower step)."""
    opt = runtime.load(exported["hyperadam"], threads=threads)
    w = np.ones(5000, np.float32)
    stepper = opt.bind([w], chunk_size=1024)
    assert stepper.num_chunks == 5
    template = stepper.state_dict()
    state = {k: np.full_like(v, TINY) for k, v in template["state"].items()}
    stepper.load_state_dict({**template, "num_steps": 1, "state": state})
    stepper.step([np.zeros_like(w)])
    after = stepper.state_dict()["state"]
    for name in ("m", "v", "b", "gamma"):
        values = np.abs(after[name])
        subnormal = (values > 0) & (values < np.finfo(np.float32).tiny)
        assert not subnormal.any(), name
    assert np.isfinite(w).all()
    assert not flushes_here()
    opt.close()


def test_opening_sessions_leaves_the_creating_threads_mode_as_it_was(exported):
    """onnxruntime sets the mode of the thread that creates a process's first session, for
    good; the runtime restores it (a fresh process, so this session is really the first)."""
    code = (
        "import numpy as np, runtime\n"
        f"runtime.load({str(exported['hyperadam'])!r})\n"
        "print(float((np.array([np.float32(1e-39)]) * np.float32(1.0))[0]) != 0.0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
