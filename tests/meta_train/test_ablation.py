"""An ablation arm: trained for its wall-time budget, its θ file and MLflow run say what it was."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from meta_train.ablation import ARMS, ArmConfig, train_arm
from meta_train.theta_source import load_theta_source
from runtime.theta import load_theta


def test_an_arm_logs_its_whole_config_and_seed_and_saves_a_loadable_theta(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    arm = ArmConfig("probe", horizon=20, truncation=10, meta_batch=2, seed=3)
    summary = train_arm(arm, minutes=0.01, out=tmp_path / "runs", tracking_uri=uri)
    assert summary["updates"] >= 1
    artifact = load_theta(tmp_path / "runs" / "probe" / "theta.npz")
    assert artifact.method == "hyperadam-tensor"
    assert artifact.meta["arm"]["seed"] == 3 and artifact.meta["updates"] == summary["updates"]
    optimizer, theta = load_theta_source(tmp_path / "runs" / "probe" / "theta.npz")
    assert optimizer.name == "hyperadam-tensor" and set(theta) == set(optimizer.theta_shapes())
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(artifact.meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.params["seed"]) == 3
    assert json.loads(run.data.params["variant"]) == "tensor"
    assert json.loads(run.data.params["family_config"])["family"] == "small"


def test_the_arms_differ_from_the_first_in_one_lever_each():
    base = ARMS["tensor-small-log"]
    for arm in ARMS.values():
        changed = {
            f for f in ("variant", "family", "meta_loss", "init")
            if getattr(arm, f) != getattr(base, f)
        }  # fmt: skip
        assert len(changed) <= 1, (arm.name, changed)


def test_bad_arms_are_refused():
    with pytest.raises(ValueError, match="variant"):
        ArmConfig("x", variant="nope")
    with pytest.raises(ValueError, match="truncation"):
        ArmConfig("x", horizon=30, truncation=20)
