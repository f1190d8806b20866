"""``hyperadam export`` and ``hyperadam registry``: from a run's θ to a gated champion, and the
one-line errors of both commands.

The run is made here with the artifact layout of ``meta_training`` (``theta/best/theta.npz``,
``checkpoints/step-*.ckpt``, the digests as params) in a real sqlite store, so the commands are
tested without a meta-training run's minutes.
"""

from __future__ import annotations

import json

import pytest

import runtime
from meta_train import checkpoint as ckpt_lib
from meta_train.checkpoint import Checkpoint
from meta_train.cli import main
from meta_train.learner import LearnerState
from meta_train.run_config import RunConfig, config_digest
from meta_train.seeding import generator
from runtime import manifest as mf
from runtime.sources import BUILTIN_DIR

BUILTIN_THETA = BUILTIN_DIR / "hyperadam" / mf.THETA_FILE

EXPERIMENT = "hyperadam-tests"  # made by the tracking_uri fixture, artifacts under tmp_path
FAMILY = "f" * 64


@pytest.fixture
def run_id(tracking_uri, tmp_path):
    """A run as meta-training leaves it: best θ validated at step 10, checkpoints 10 and 20."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    config = RunConfig()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run = client.create_run(experiment, tags={"hyperadam.workers": "2"})
    rid = run.info.run_id
    for key, value in {"optimizer": "hyperadam", "seed": "0", "family_digest": FAMILY,
                       "config_digest": config_digest(config)}.items():
        client.log_param(rid, key, value)
    optimizer = config.make_optimizer()
    work = tmp_path / "work"
    for step in (10, 20):
        flat = optimizer.flatten(optimizer.init_theta(generator(step))).numpy()
        learner = LearnerState(step=step, theta=flat, adam={}, trajectories=(None,))
        path = work / ckpt_lib.checkpoint_name(step)
        ckpt_lib.save(path, Checkpoint(config.to_dict(), learner, run_id=rid, family_digest=FAMILY))
        client.log_artifact(rid, str(path), "checkpoints")
        if step == 10:
            lineage = {"mlflow_run_id": rid, "task_digest": FAMILY,
                       "config_digest": config_digest(config), "step": step}
            best = ckpt_lib.save_theta(work / "best" / "theta.npz", optimizer=optimizer,
                                       theta=flat, lr=config.unroll.lr, lineage=lineage)
            client.log_artifact(rid, str(best), "theta/best")
    client.set_terminated(rid, "FINISHED")
    return rid


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_register_list_promote_and_load(tracking_uri, run_id, tmp_path, capsys,
                                               monkeypatch):
    out = tmp_path / "best"
    code, stdout, err = cli(capsys, "export", "--run", run_id, "--out", str(out), "--register",
                            "opt", "--tracking-uri", tracking_uri)
    assert code == 0, err
    assert "registered opt version 1 (alias candidate): models:/opt@candidate" in stdout
    lineage = mf.load_manifest(out).lineage
    assert (lineage["mlflow_run_id"], lineage["step"], lineage["task_digest"]) == (
        run_id, 10, FAMILY)
    assert lineage["config_digest"] == config_digest(RunConfig())
    assert "2 workers" in lineage["trainer"]

    # The newest checkpoint, then a named step: θ of step 20, then of step 10 (= best).
    code, _, err = cli(capsys, "export", "--run", run_id, "--checkpoint", "last", "--out",
                       str(tmp_path / "last"), "--register", "opt", "--tracking-uri", tracking_uri)
    assert code == 0, err
    assert mf.load_manifest(tmp_path / "last").lineage["step"] == 20
    code, _, err = cli(capsys, "export", "--run", run_id, "--checkpoint", "10", "--out",
                       str(tmp_path / "ten"), "--tracking-uri", tracking_uri)
    assert code == 0, err
    assert (mf.load_manifest(tmp_path / "ten").lineage["theta_sha256"]
            == lineage["theta_sha256"])

    code, stdout, _ = cli(capsys, "registry", "list", "opt", "--tracking-uri", tracking_uri)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("opt v1  [-]  hyperadam J=20 opset 18")
    assert lines[1].startswith("opt v2  [candidate]") and "eval: none" in lines[1]

    # A random-init θ loses to Adam: the gate fails, the evaluation is logged, no champion.
    code, stdout, err = cli(capsys, "registry", "promote", "opt", "--version", "2", "--tasks",
                            "mnist-nn-relu-100", "--runs", "1", "--steps", "3", "--cache-dir",
                            str(tmp_path / "cache"), "--tracking-uri", tracking_uri)
    assert code == 0, err
    assert "-> FAILED; champion unchanged (none)" in stdout
    code, stdout, _ = cli(capsys, "registry", "list", "opt", "--json", "--tracking-uri",
                          tracking_uri)
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert rows[1]["evaluation"]["passed"] == "False" and rows[1]["aliases"] == ["candidate"]
    assert float(rows[1]["evaluation"]["mean_ratio"]) > 1

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("HYPERADAM_CACHE_DIR", str(tmp_path / "cache"))
    assert runtime.load("models:/opt@candidate").manifest.lineage["step"] == 20


def test_export_of_a_theta_file_registers_in_its_own_run(tracking_uri, tmp_path, capsys):
    from export import save_theta
    from meta_train.optimizers import make_learned_optimizer

    theta_file = tmp_path / "theta.npz"
    save_theta(theta_file, "dm", make_learned_optimizer("dm").init_theta(generator(0)))
    code, stdout, err = cli(capsys, "export", "--theta", str(theta_file), "--out",
                            str(tmp_path / "dm"), "--register", "dm-opt", "--tracking-uri",
                            tracking_uri)
    assert code == 0, err
    assert "registered dm-opt version 1" in stdout
    code, stdout, _ = cli(capsys, "registry", "list", "--tracking-uri", tracking_uri)
    assert stdout.startswith("dm-opt v1  [candidate]  dm hidden_size=20 opset 18")


ERRORS = [
    (["export", "--run", "0" * 32, "--out", "{tmp}/x"], r"unknown run id '0{32}'"),
    (["export", "--run", "{run}", "--checkpoint", "7", "--out", "{tmp}/x"],
     r"run \w+ has no checkpoint at step 7; it has steps 10, 20$"),
    (["export", "--run", "{run}", "--checkpoint", "soon", "--out", "{tmp}/x"],
     r"--checkpoint must be best, last or a step, got 'soon'$"),
    (["export", "--run", "{run}", "--out", "{tmp}/full"],
     r"--out .*full exists and is not an empty folder$"),
    (["export", "--theta", "{tmp}/none.npz", "--out", "{tmp}/x"], r"--theta .*none.npz: no such"),
    (["export", "--theta", "{tmp}/full/notes.txt", "--checkpoint", "last", "--out", "{tmp}/x"],
     r"--checkpoint applies to --run"),
    (["export", "--run", "{run}", "--out", "{tmp}/x", "--register", "a/b"],
     r"--register: model name must start with a letter or digit"),
    (["registry", "list", "nope"], r"no registered model named 'nope' in sqlite:////\S+\.db$"),
    (["registry", "promote", "nope", "--version", "1", "--tasks", "mnist-nn-relu-100"],
     r"no registered model named 'nope' in sqlite:////\S+\.db$"),
    (["registry", "promote", "nope", "--version", "1", "--tasks", "mnist-nope"],
     r"unknown task\(s\) \['mnist-nope'\]"),
    (["registry", "promote", "nope", "--version", "1", "--gate", "0"],
     r"gate must be a finite ratio > 0, got 0.0$"),
    (["export", "--theta", str(BUILTIN_THETA), "--out", "/proc/hyperadam/out"],
     r"cannot write --out /proc/hyperadam/out: No such file or directory: /proc/hyperadam$"),
]


@pytest.mark.parametrize(("argv", "match"), ERRORS, ids=[
    "unknown-run", "missing-step", "bad-checkpoint", "non-empty-out", "missing-theta",
    "checkpoint-with-theta", "bad-name", "list-unknown", "promote-unknown", "unknown-task",
    "bad-gate", "unwritable-out",
])
def test_errors_are_one_line_with_status_2(tracking_uri, run_id, tmp_path, capsys, argv, match):
    import re

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep")
    args = [a.format(tmp=tmp_path, run=run_id) for a in argv] + ["--tracking-uri", tracking_uri]
    code, _, err = cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hyperadam: error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "x").exists() and (tmp_path / "full" / "notes.txt").exists()


def test_missing_best_theta_says_what_to_use_instead(tracking_uri, run_id, tmp_path, capsys):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    bare = client.create_run(experiment).info.run_id
    code, _, err = cli(capsys, "export", "--run", bare, "--out", str(tmp_path / "x"),
                       "--tracking-uri", tracking_uri)
    assert code == 2
    assert err.strip() == (
        f"hyperadam: error: run {bare}: no best θ (theta/best/theta.npz): the run has not "
        "validated yet; use --checkpoint last or a step"
    )


def test_a_fine_tuned_run_reports_its_starting_theta_and_the_cost_of_both(
    tracking_uri, run_id, tmp_path, capsys
):
    from mlflow import MlflowClient

    from export.theta_io import load_theta, theta_sha256

    optimizer = RunConfig().make_optimizer()
    start = tmp_path / "start.npz"
    ckpt_lib.save_theta(start, optimizer=optimizer,
                        theta=optimizer.flatten(optimizer.init_theta(generator(3))).numpy(),
                        lr=None, lineage={"meta_updates": 500, "wall_time_s": 100.0})
    digest = theta_sha256(load_theta(start).theta)
    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in {"init.kind": "theta", "init.theta": str(start),
                       "init.theta_sha256": digest}.items():
        client.log_param(run_id, key, value)

    code, _, err = cli(capsys, "export", "--run", run_id, "--out", str(tmp_path / "a"),
                       "--tracking-uri", tracking_uri)
    assert code == 0, err
    lineage = mf.load_manifest(tmp_path / "a").lineage
    assert lineage["started_from"] == digest
    assert (lineage["step"], lineage["meta_updates"]) == (10, 510)  # 500 before, 10 in this run
    # Once the starting file holds another θ, its costs are not this θ's: the digest remains.
    ckpt_lib.save_theta(start, optimizer=optimizer,
                        theta=optimizer.flatten(optimizer.init_theta(generator(4))).numpy(),
                        lr=None, lineage={"meta_updates": 500})
    code, _, err = cli(capsys, "export", "--run", run_id, "--checkpoint", "last", "--out",
                       str(tmp_path / "b"), "--tracking-uri", tracking_uri)
    assert code == 0, err
    lineage = mf.load_manifest(tmp_path / "b").lineage
    assert lineage["started_from"] == digest and lineage["meta_updates"] == 20
