"""GPU paths (CUDA provider, torch CUDA tensors, CuPy, stream sync): benchmarks/gpu_check.py's
checks under pytest; each skips with its reason where the machine lacks the prerequisite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(gpu_check.CHECKS))
def test_gpu_path(hyperadam_folder, name):
    try:
        gpu_check.CHECKS[name](hyperadam_folder)
    except gpu_check.Skip as reason:
        pytest.skip(str(reason))
