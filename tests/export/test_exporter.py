"""export_optimizer: folder contents, manifest, recorded parity, refusals."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from export import ParityError, export_optimizer, load_theta, save_theta
from export import parity as parity_lib
from meta_train.optimizers import make_learned_optimizer
from meta_train.seeding import generator
from runtime import manifest as mf

LINEAGE = {"mlflow_run_id": "0123abcd", "step": 4200, "task_digest": "f" * 64}
# The paper's methods; the tensor-wise variant's export is tests/export/test_tensorwise_export.py.
PAPER_METHODS = ("dm", "hyperadam", "rnnprop")


def theta_for(method: str, seed: int = 0) -> dict:
    return make_learned_optimizer(method).init_theta(generator(seed))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        method: (
            root / method,
            export_optimizer(method, theta_for(method), root / method, lineage=LINEAGE),
        )
        for method in PAPER_METHODS
    }


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_folder_and_manifest(exports, method):
    folder, manifest = exports[method]
    roles = set(mf.METHODS[method].graphs(**manifest.config))
    expected_files = {mf.GRAPH_FILES[r] for r in roles} | {mf.THETA_FILE, mf.MANIFEST_FILE}
    assert {p.name for p in folder.iterdir()} == expected_files
    assert mf.load_manifest(folder) == manifest
    assert manifest.default_lr == make_learned_optimizer(method).default_lr
    assert {k: manifest.lineage[k] for k in LINEAGE} == LINEAGE
    artifact = load_theta(folder / mf.THETA_FILE)
    theta = theta_for(method)
    assert artifact.method == method
    assert all(np.array_equal(artifact.theta[k], theta[k].numpy()) for k in theta)
    assert runtime.load(folder).method == method


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_parity_is_recorded_for_every_case_within_tolerance(exports, method):
    parity = exports[method][1].parity
    assert parity["passed"] is True and parity["sizes"] == [2, 1000]
    names = {case["case"] for case in parity["cases"]}
    for p in (2, 1000):
        for kind in ("random", "zero"):
            assert {f"p={p} {kind}-gradient fused", f"p={p} {kind}-gradient chunked"} <= names
    assert {"100-step ReLU-MLP trajectory fused", "100-step ReLU-MLP trajectory chunked"} <= names
    for case in parity["cases"]:
        assert case["max_error"] <= case["tolerance"], case
        if "chunked" in case["case"]:
            assert case["chunks"] >= 2
    assert parity["max_error"]["step"] <= parity_lib.STEP_TOLERANCE
    # measured: one step agrees to fp32 round-off, far inside the stated tolerance
    assert parity["max_error"]["step"] < 2e-6


def test_theta_file_supplies_lineage_and_step_size(tmp_path):
    path = save_theta(
        tmp_path / "theta.npz",
        "rnnprop",
        theta_for("rnnprop"),
        mlflow_run_id="run-1",
        step=3,
        lr=0.05,
        config_digest="x",
    )
    manifest = export_optimizer(
        "rnnprop",
        path,
        tmp_path / "out",
        parity_sizes=(2,),
        trajectory_steps=5,
        lineage={"step": 5},
    )
    assert manifest.lineage["mlflow_run_id"] == "run-1" and manifest.lineage["step"] == 5
    assert manifest.default_lr == 0.05
    with pytest.raises(ValueError, match=r"holds θ of 'rnnprop', not 'dm'$"):
        export_optimizer("dm", path, tmp_path / "dm")


def test_refusals(tmp_path):
    theta = theta_for("hyperadam")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match=r"taken exists; pass overwrite=True"):
        export_optimizer("hyperadam", theta, tmp_path / "taken")
    broken = dict(theta)
    del broken["weight_bias"]
    with pytest.raises(ValueError, match=r"missing \['weight_bias'\], unexpected \[\]$"):
        export_optimizer("hyperadam", broken, tmp_path / "a")
    broken = dict(theta, weight_kernel=np.zeros((20, 19), np.float32))
    with pytest.raises(ValueError, match=r"theta\['weight_kernel'\] has shape \(20, 19\)"):
        export_optimizer("hyperadam", broken, tmp_path / "b")
    with pytest.raises(ValueError, match=r"lineage keys must be among .* got \['run'\]$"):
        export_optimizer("hyperadam", theta, tmp_path / "c", lineage={"run": 1})
    with pytest.raises(
        ValueError, match=r"^method must be one of \['dm', 'hyperadam', .*'rnnprop'\]"
    ):
        export_optimizer("adam", theta, tmp_path / "d")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(parity_lib, "STEP_TOLERANCE", 0.0)
    with pytest.raises(
        ParityError,
        match=r"^parity check failed: p=2 random-gradient fused: .* "
        r"above the tolerance 0$",
    ):
        export_optimizer(
            "dm", theta_for("dm"), tmp_path / "out", parity_sizes=(2,), trajectory_steps=2
        )
    assert list(tmp_path.iterdir()) == []
