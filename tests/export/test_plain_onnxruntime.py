"""Exported graphs run in an environment with only numpy and plain ``onnxruntime`` installed.

The interpreter is ``$HYPERADAM_PLAIN_ORT_PYTHON``, else ``.venv-plain-ort/bin/python`` at the
repository root (``scripts/setup --test`` makes it); without it the test is skipped. Every graph
of each method's folder is loaded there with ``onnxruntime.InferenceSession`` and run once on
the same inputs as in this (onnxruntime-gpu) environment; the outputs must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from export import export_optimizer
from meta_train.optimizers import make_learned_optimizer
from meta_train.seeding import generator
from runtime import manifest as mf

ROOT = Path(__file__).resolve().parents[2]
PLAIN = Path(os.environ.get("HYPERADAM_PLAIN_ORT_PYTHON") or ROOT / ".venv-plain-ort/bin/python")
N = 7  # coordinates of the one step
ABLATION = ROOT / "checkpoints" / "ablation"
TENSORWISE_THETA = {
    mf.HYPERADAM_TENSOR: ABLATION / "tensor-small-log" / "theta.npz",
    mf.HYPERADAM_TENSOR_UNBOUNDED: ABLATION / "tensor-unbounded-small-log" / "theta.npz",
    mf.HYPERADAM_TENSOR_ADAPTIVE: ABLATION / "tensor-adaptive-start" / "theta.npz",
    mf.HYPERADAM_TENSOR_TREND: ABLATION / "tensor-trend-start" / "theta.npz",
    mf.HYPERADAM_TENSOR_TREND_ANNEALED: ABLATION / "tensor-trend-annealed-start" / "theta.npz",
}

# Runs in the plain interpreter: numpy and onnxruntime only, nothing of hyperadam.
SCRIPT = """
import importlib.metadata as md, json, sys
import numpy as np, onnxruntime as ort

folder, inputs_path, out_path, roles = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
inputs = dict(np.load(inputs_path))
outputs = {}
for role_file in roles:
    role, file = role_file.split("=")
    session = ort.InferenceSession(f"{folder}/{file}", providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[f"{role}/{i.name}"] for i in session.get_inputs()}
    for out, value in zip(session.get_outputs(), session.run(None, feed)):
        outputs[f"{role}/{out.name}"] = value
np.savez(out_path, **outputs)
installed = []
for dist in ("onnxruntime", "onnxruntime-gpu"):
    try:
        md.version(dist)
        installed.append(dist)
    except md.PackageNotFoundError:
        pass
print(json.dumps(installed))
"""


def plain_python() -> Path:
    if not PLAIN.is_file():
        pytest.skip(
            f"no plain-onnxruntime interpreter at {PLAIN}: run scripts/setup --test or set "
            "HYPERADAM_PLAIN_ORT_PYTHON to a Python with only numpy + onnxruntime"
        )
    return PLAIN


def step_inputs(manifest: mf.Manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of every graph: gradients and parameters N(0, 1), everything else in [0.1, 1]
    (second moments and sums of squares must be positive)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for role, spec in manifest.graphs.items():
        for tensor in spec.inputs:
            shape = tuple(N if d == mf.COORDS else d for d in tensor.shape)
            if tensor.name in (mf.GRAD, mf.PARAM):
                value = rng.standard_normal(shape)
            else:
                value = rng.uniform(0.1, 1.0, shape)
            inputs[f"{role}/{tensor.name}"] = np.asarray(value, np.float32)
    return inputs


@pytest.mark.parametrize("method", sorted(mf.METHODS))
def test_every_graph_runs_in_plain_onnxruntime_like_here(method, tmp_path):
    python = plain_python()
    folder = tmp_path / method
    # The tensor-wise variants (not among the paper's learned optimizers) from their θ files
    theta = TENSORWISE_THETA.get(method) or make_learned_optimizer(method).init_theta(generator(0))
    manifest = export_optimizer(method, theta, folder, parity_sizes=(2,), trajectory_steps=2)
    inputs = step_inputs(manifest)
    np.savez(tmp_path / "inputs.npz", **inputs)
    roles = [f"{role}={spec.file}" for role, spec in manifest.graphs.items()]
    result = subprocess.run(
        [str(python), "-c", SCRIPT, str(folder), str(tmp_path / "inputs.npz"),
         str(tmp_path / "outputs.npz"), *roles],
        capture_output=True, text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["onnxruntime"]
    plain = dict(np.load(tmp_path / "outputs.npz"))

    expected = {}
    for role, spec in manifest.graphs.items():
        session = onnxruntime.InferenceSession(
            str(folder / spec.file), providers=["CPUExecutionProvider"]
        )
        feed = {i.name: inputs[f"{role}/{i.name}"] for i in session.get_inputs()}
        for out, value in zip(session.get_outputs(), session.run(None, feed), strict=True):
            expected[f"{role}/{out.name}"] = value
    assert sorted(plain) == sorted(expected)
    for name, value in expected.items():
        assert np.all(np.isfinite(value)), name
        np.testing.assert_allclose(plain[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
