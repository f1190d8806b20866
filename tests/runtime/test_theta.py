"""runtime.theta: the small inference-θ artifact (npz, no pickle)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meta_train.optimizers import HyperAdam
from meta_train.seeding import generator
from runtime.theta import load_theta, save_theta, theta_sha256


def test_round_trip_keeps_order_values_and_meta(tmp_path):
    theta = HyperAdam(4).init_theta(generator(0))
    path = save_theta(tmp_path / "t.npz", "hyperadam", theta, mlflow_run_id="abc", step=7)
    artifact = load_theta(path)
    assert artifact.method == "hyperadam"
    assert artifact.meta == {"mlflow_run_id": "abc", "step": 7}
    assert list(artifact.theta) == list(theta)
    assert all(np.array_equal(artifact.theta[k], theta[k].numpy()) for k in theta)
    assert all(a.dtype == np.float32 for a in artifact.theta.values())
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary left behind
    assert theta_sha256(artifact.theta) == theta_sha256({k: v.numpy() for k, v in theta.items()})


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError, match=r"^theta meta must be JSON-serialisable"):
        save_theta(tmp_path / "t.npz", "hyperadam", {"a": np.zeros(2)}, when=object())


def test_integer_theta_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^theta\['a'\] must be floating point, got dtype int64$"):
        save_theta(tmp_path / "t.npz", "hyperadam", {"a": np.zeros(2, np.int64)})


def test_foreign_or_future_files_are_refused(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match=r"has no __header__ entry: not written by save_theta$"):
        load_theta(tmp_path / "plain.npz")
    header = {"format": "hyperadam.theta", "format_version": 2, "method": "dm", "names": []}
    np.savez(tmp_path / "v2.npz", __header__=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(ValueError, match=r"format 'hyperadam\.theta' version 2 is not supported"):
        load_theta(tmp_path / "v2.npz")
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"is not a θ artifact \(\.npz\)"):
        load_theta(tmp_path / "obj.npy")  # object arrays need pickle: never loaded


def test_the_old_export_theta_io_path_still_imports():
    import export.theta_io
    import runtime.theta

    assert export.theta_io.load_theta is runtime.theta.load_theta
    assert export.theta_io.save_theta is runtime.theta.save_theta


def test_a_truncated_file_is_a_value_error(tmp_path):
    path = save_theta(tmp_path / "t.npz", "hyperadam", HyperAdam(4).init_theta(generator(0)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy: np.load raises BadZipFile
    with pytest.raises(ValueError, match=r"is not a θ artifact \(\.npz\)"):
        load_theta(path)
