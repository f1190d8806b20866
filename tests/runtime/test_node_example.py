"""examples/node/step.mjs (onnxruntime-node) steps a Float32Array as the Python runtime does."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import runtime

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("examples/node/node_modules is missing: run `npm ci` in examples/node")
    return node


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["plain", "weight-decay"])
def test_node_step_matches_the_python_runtime(hyperadam_folder, tmp_path, weight_decay):
    node = node_or_skip()
    rng = np.random.default_rng(0)
    w = rng.normal(size=50).astype(np.float32)
    grads = [(rng.normal(size=50) * 0.1).astype(np.float32) for _ in range(4)]
    python_w = w.copy()
    stepper = runtime.load(hyperadam_folder, threads=1).bind(
        [python_w], lr=0.01, weight_decay=weight_decay
    )
    for g in grads[:3]:
        stepper.step([g])
    saved = stepper.state_dict()  # the state before the 4th step, handed to node
    state = {  # graph layout: a [n, k] field is k rows of n values
        name: (value.T if value.ndim == 2 and value.shape[0] == 50 else value).ravel().tolist()
        for name, value in saved["state"].items()
    }
    inputs = {"w": python_w.tolist(), "grad": grads[3].tolist(), "lr": 0.01, "state": state,
              "weight_decay": weight_decay}  # fmt: skip
    (tmp_path / "in.json").write_text(json.dumps(inputs))
    stepper.step([grads[3]])

    result = subprocess.run(
        [node, str(EXAMPLE / "step.mjs"), str(hyperadam_folder), str(tmp_path / "in.json"),
         str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=120, cwd=EXAMPLE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    node_w = np.asarray(out["w"], np.float32)
    np.testing.assert_allclose(node_w, python_w, rtol=1e-6, atol=1e-7)
    h = np.asarray(out["state"]["h"], np.float32).reshape(20, 50).T
    np.testing.assert_allclose(h, stepper.state_dict()["state"]["h"], rtol=1e-5, atol=1e-6)


def _node_takes_the_fourth_step(folder, grads, tmp_path):
    """Three steps in Python, the fourth in node from the saved state and in Python; returns
    node's output, the Python state after the fourth step and before it, and both w."""
    node = node_or_skip()
    rng = np.random.default_rng(1)
    w = rng.normal(size=50).astype(np.float32)
    python_w = w.copy()
    stepper = runtime.load(folder, threads=1).bind([python_w])
    for g in grads[:3]:
        stepper.step([g])
    saved = stepper.state_dict()["state"]
    state = {  # graph layout: a [n, k] field is k rows of n values
        name: (value.T if value.ndim == 2 and value.shape[0] == 50 else value).ravel().tolist()
        for name, value in saved.items()
    }
    inputs = {"w": python_w.tolist(), "grad": grads[3].tolist(), "state": state}
    (tmp_path / "in.json").write_text(json.dumps(inputs))
    stepper.step([grads[3]])
    result = subprocess.run(
        [node, str(EXAMPLE / "step.mjs"), str(folder), str(tmp_path / "in.json"),
         str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=120, cwd=EXAMPLE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    return out, stepper.state_dict()["state"], saved, python_w


# with the step scale ℓ
SCALED = ("hyperadam-tensor-adaptive", "hyperadam-tensor-trend", "hyperadam-tensor-trend-annealed")


@pytest.mark.parametrize("method", ["hyperadam-tensor", "hyperadam-tensor-unbounded", *SCALED])
def test_node_steps_the_tensorwise_variant_as_the_python_runtime(
    tensorwise_folders, tmp_path, method
):
    """The per-array statistics (rms of the one array's gradient; the adaptive and trend
    variants' sums of their cosine, from a terms graph that reads the state) computed in node
    from the array_terms graph, then the fused step: the Python runtime's step, the step count
    and the scaled variants' step scale too."""
    rng = np.random.default_rng(1)
    rng.normal(size=50)  # the draws of w
    grads = [(rng.normal(size=50) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
             for _ in range(4)]  # fmt: skip
    grads[3][:5] = 0.0
    out, after, saved, python_w = _node_takes_the_fourth_step(
        tensorwise_folders[method], grads, tmp_path
    )
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), python_w, rtol=1e-6, atol=1e-7)
    assert out["state"]["t"] == [4.0] == after["t"].tolist()
    for name in ("h", "m", "feat_m"):
        got = np.asarray(out["state"][name], np.float32).reshape(-1, 50).T
        np.testing.assert_allclose(got, after[name], rtol=1e-5, atol=1e-7)
    if method in SCALED:  # ℓ moved this step, as in Python
        assert set(out["state"]) == set(after)
        got = np.asarray(out["state"]["log_scale"], np.float32)
        assert np.abs(got - saved["log_scale"]).min() > 1e-4
        np.testing.assert_allclose(got, after["log_scale"], rtol=0, atol=1e-7)


# Three gradients, then the fourth, whose scales make ‖g‖·‖y‖ ~ 1e-30 in the fourth step's
# cosine: the adaptive variant's y = D, the previous direction (~1e-13 after gradients of 1e-25,
# whose squares underflow: v = 0, moments ~1e-26); the trend variant's y = the β = 0.99 momentum
# (~3e-15 after gradients of 1e-13, all along one direction, so that the cosine is not ~0).
TINY_COSINE_SCALES = {
    SCALED[0]: (1e-25,) * 3 + (1e-17,),
    **{trend: (1e-13,) * 3 + (1e-17,) for trend in SCALED[1:]},
}


@pytest.mark.parametrize("method", SCALED)
def test_node_sums_the_adaptive_variants_cosine_terms(tensorwise_folders, tmp_path, method):
    """A fourth step whose ‖g‖·‖y‖ is ~1e-30 (``TINY_COSINE_SCALES``), where averaging instead
    of summing the cosine's terms would move its 1e-30 and ℓ with it. Node's ℓ is Python's."""
    rng = np.random.default_rng(2)
    shared = rng.normal(size=50) if method in SCALED[1:] else 0.0
    grads = [((shared + rng.normal(size=50)) * scale).astype(np.float32)
             for scale in TINY_COSINE_SCALES[method]]  # fmt: skip
    out, after, saved, python_w = _node_takes_the_fourth_step(
        tensorwise_folders[method], grads, tmp_path
    )
    got = np.asarray(out["state"]["log_scale"], np.float32)
    assert np.abs(got - saved["log_scale"]).min() > 1e-4
    np.testing.assert_allclose(got, after["log_scale"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), python_w, rtol=1e-6, atol=1e-7)


def test_node_refuses_unknown_per_array_statistics(tensorwise_folders, tmp_path):
    node = node_or_skip()
    folder = tmp_path / "copy"
    shutil.copytree(tensorwise_folders["hyperadam-tensor"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["per_array_statistics"]["terms"] = ["grad_abs"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "in.json").write_text(json.dumps({"w": [0.5], "grad": [0.1]}))
    result = subprocess.run(
        [node, str(EXAMPLE / "step.mjs"), str(folder), str(tmp_path / "in.json"),
         str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=120, cwd=EXAMPLE,
    )  # fmt: skip
    assert result.returncode == 2
    assert 'per-array statistics ["grad_abs"] are not known to this example' in result.stderr


def test_node_refuses_a_tampered_folder(hyperadam_folder, tmp_path):
    node = node_or_skip()
    folder = tmp_path / "copy"
    shutil.copytree(hyperadam_folder, folder)
    with open(folder / "fused.onnx", "ab") as f:
        f.write(b"\0")
    (tmp_path / "in.json").write_text(json.dumps({"w": [0.0], "grad": [1.0]}))
    result = subprocess.run(
        [node, str(EXAMPLE / "step.mjs"), str(folder), str(tmp_path / "in.json"),
         str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=120, cwd=EXAMPLE,
    )  # fmt: skip
    assert result.returncode == 2 and "does not match its sha256" in result.stderr


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_node_refuses_a_graph_file_that_is_not_a_plain_name(hyperadam_folder, tmp_path, where):
    """An edited manifest that names a graph outside the folder (with that file's own sha256
    listed) must not get that graph loaded and run."""
    node = node_or_skip()
    folder = tmp_path / "copy"
    shutil.copytree(hyperadam_folder, folder)
    evil = tmp_path / "evil.onnx"
    evil.write_bytes((folder / "fused.onnx").read_bytes())
    graph_file = {"parent": "../evil.onnx", "absolute": str(evil), "subfolder": "sub/x.onnx"}
    graph_file = graph_file[where]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["graphs"]["fused"]["file"] = graph_file
    manifest["files"][graph_file] = runtime.manifest.sha256_file(evil)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "sub").mkdir()
    shutil.copy(evil, folder / "sub" / "x.onnx")
    (tmp_path / "in.json").write_text(json.dumps({"w": [0.5, 1.0], "grad": [0.1, -0.1]}))
    result = subprocess.run(
        [node, str(EXAMPLE / "step.mjs"), str(folder), str(tmp_path / "in.json"),
         str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=120, cwd=EXAMPLE,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    refusal = f'graph file "{graph_file}" is not a plain file name listed in manifest.json'
    assert refusal in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_the_readme_node_command_runs_on_the_shipped_input(tmp_path):
    """README: `cd examples/node && npm ci` then this command; in.json ships with the example."""
    node = node_or_skip()
    command = "node step.mjs ../../runtime/builtin/hyperadam in.json out.json"
    assert command in (EXAMPLE.parents[1] / "README.md").read_text()
    given = json.loads((EXAMPLE / "in.json").read_text())
    args = command.split()[1:-1] + [str(tmp_path / "out.json")]
    result = subprocess.run([node, *args], capture_output=True, text=True, timeout=120,
                            cwd=EXAMPLE)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    python_w = np.asarray(given["w"], np.float32)
    stepper = runtime.load("hyperadam", threads=1).bind([python_w], lr=given["lr"])
    stepper.step([np.asarray(given["grad"], np.float32)])
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), python_w, rtol=1e-6, atol=1e-7)
