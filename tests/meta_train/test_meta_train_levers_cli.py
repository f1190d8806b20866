"""``hyperadam meta-train --config`` trains an issue-15 arm end to end: the tensor variant on the
small family with the log meta-loss, PES and log-uniform horizons, on Ray workers, logged to
MLflow, checkpointed and resumed bitwise."""

import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from meta_train import checkpoint as ckpt
from meta_train import cli
from meta_train.run_config import build_config
from meta_train.training import init_theta_flat, train_local
from runtime.theta import load_theta

EXPERIMENT = "hyperadam-tests"  # made by the tracking_uri fixture
ARM = {
    "task": "small",
    "num_candidates": 4,
    # One-layer MLPs of width 16 on 8×8 MNIST, half of them reparameterised: milliseconds.
    "family": {"model_weights": [1, 0, 0], "max_depth": 1, "widths": [16], "batch_size": 16},
    "unroll": {"horizon": 4, "truncation": 2, "meta_loss": "log"},
    "meta_optim": {"lr": 1e-3},
    "validation": {"runs": 1, "steps": 5, "every": 4},
    "experimental": {
        "variant": "tensor",
        "adam_start": {"lr": 0.003},
        "estimator": {"kind": "pes", "sigma": 0.05, "pairs": 1},
        "horizons": {"kind": "log_uniform", "min_steps": 2, "max_steps": 10, "offsets": True},
    },
}


def reference_theta(steps):
    config = build_config(ARM)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        theta, _ = train_local(
            config.make_optimizer(), config.make_family(), steps=steps, run_seed=0,
            unroll=config.unroll, meta_optim=config.meta_optim, meta_batch=2,
            experimental=config.experimental,
            theta_flat=init_theta_flat(config.make_optimizer(), 0, config.init,
                                       config.experimental),
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    return theta.numpy()


@pytest.mark.slow  # meta-training through the CLI on a Ray cluster
def test_a_pes_tensor_small_family_run_logs_checkpoints_and_resumes_exactly(
    ray_address, tracking_uri, tmp_path, capsys
):
    path = tmp_path / "arm.json"
    path.write_text(json.dumps(ARM))
    args = ["--config", str(path), "--ray-address", ray_address, "--tracking-uri", tracking_uri,
            "--experiment", EXPERIMENT, "--work-dir", str(tmp_path / "work"), "--workers", "2",
            "--meta-batch", "2", "--no-progress"]  # fmt: skip
    assert cli.main(["meta-train", *args, "--steps", "5", "--checkpoint-every", "0"]) == 0
    run_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    client = MlflowClient(tracking_uri)
    params = client.get_run(run_id).data.params
    assert params["experimental.estimator.kind"] == "pes"
    assert params["experimental.horizons.kind"] == "log_uniform"
    assert params["experimental.variant"] == "tensor" and params["task"] == "small"
    assert params["unroll.meta_loss"] == "log"
    # Step 5 is mid-trajectory for a slot: the resumed workers replay its PES pairs.
    schedule = build_config(ARM).make_schedule()
    assert any(schedule.position(slot, 5).truncation for slot in range(2))

    resume = ["meta-train", "--resume", run_id, "--ray-address", ray_address,
              "--tracking-uri", tracking_uri, "--work-dir", str(tmp_path / "work"),
              "--no-progress", "--steps", "8"]  # fmt: skip
    assert cli.main(resume) == 0
    assert f"MLflow run {run_id} resumed at step 5" in capsys.readouterr().out
    local = tmp_path / "work" / run_id / "checkpoints"
    final = ckpt.load(local / ckpt.checkpoint_name(8))
    expected = reference_theta(8)
    assert np.array_equal(final.learner.theta, expected)
    steps = [m.step for m in client.get_metric_history(run_id, "meta/loss")]
    assert steps == list(range(8))
    # Every 4 steps and at the end of each pass (step 5, where the first one stopped).
    assert [m.step for m in client.get_metric_history(run_id, "validation/score")] == [4, 5, 8]
    artifact = load_theta(
        client.download_artifacts(run_id, "theta/final/theta.npz", str(tmp_path))
    )
    assert artifact.method == "hyperadam-tensor" and artifact.meta["step"] == 8
