"""Chunked steps bound temporary memory by the chunk size, not the model size."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses measuring peak memory (≈ 10 s)

SCRIPT = """
import sys, numpy as np, runtime

def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

p, chunk_size = int(sys.argv[1]), int(sys.argv[2])
stepper = runtime.load(sys.argv[3], threads=1).bind([np.zeros(p, np.float32)],
                                                   chunk_size=chunk_size)
grad = [np.full(p, 1e-3, np.float32)]
# Reset the peak-RSS mark so that loading and binding cannot hide the steps' own peak.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
stepper.step(grad)
stepper.step(grad)
grown = status_kib("VmHWM") - before
print((grown * 1024 - stepper.state_nbytes) / 2**20)  # beyond the state's own first touch
"""


def temporary_mib(folder, p: int, chunk_size: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(p), str(chunk_size), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_chunked_temporaries_stay_small_while_fused_grow_with_the_model(hyperadam_folder):
    p = 300_000  # 137 MiB of state; a fused step's [80, p] temporaries alone are ~92 MiB
    assert temporary_mib(hyperadam_folder, p, 4096) < 40
    assert temporary_mib(hyperadam_folder, p, p) > 200
