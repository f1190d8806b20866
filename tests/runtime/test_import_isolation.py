"""The runtime imports numpy and onnxruntime only (style §6.15): checked in a fresh process."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("torch", "jax", "ray", "mlflow", "onnx", "cupy", "meta_train", "export")


def test_importing_and_loading_the_runtime_pulls_in_no_framework(hyperadam_folder):
    code = (
        "import sys, numpy as np, runtime\n"
        f"opt = runtime.load({str(hyperadam_folder)!r})\n"
        "w = [np.ones(5, np.float32)]\n"
        "opt.bind(w).step([np.ones(5, np.float32)])\n"
        "guarded = opt.bind(w, guard=True, weight_decay=0.1)\n"  # the guard's hook: no mlflow
        "guarded.step([np.ones(5, np.float32)], loss=1.0)\n"
        "guarded.step([np.ones(5, np.float32)], loss=float('nan'))\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
