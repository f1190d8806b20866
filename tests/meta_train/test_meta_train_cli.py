"""``hyperadam meta-train`` end to end: real Ray cluster, real MLflow, killed processes.

The learner runs in-process for the smoke run and in a subprocess (``python -m meta_train.cli``,
joining the session's Ray cluster) wherever it gets killed: SIGKILL then ``--resume``, SIGINT,
and a tracking-server outage against a real ``mlflow server``.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from export.theta_io import load_theta
from meta_train import checkpoint as ckpt
from meta_train import cli
from meta_train.run_config import build_config
from meta_train.training import train_local

EXPERIMENT = "hyperadam-tests"  # made by the tracking_uri fixture, artifacts under tmp_path
# Slow enough (≈0.1 s per meta-step with 2 workers) to be killed mid-run, fast enough to finish.
SLOW_QUADRATIC = {
    "task": "quadratic",
    "num_candidates": 8,
    "family": {"dim": 1000, "rows": 64, "batch_size": 16},
    "unroll": {"horizon": 40, "truncation": 20},
    "validation": {"every": 0},
}


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def common_args(tmp_path, ray_address, uri, config=SLOW_QUADRATIC):
    return [
        "--config", str(write_json(tmp_path / "run.json", config)),
        "--ray-address", ray_address,
        "--tracking-uri", uri,
        "--experiment", EXPERIMENT,
        "--work-dir", str(tmp_path / "work"),
        "--workers", "2",
        "--meta-batch", "2",
        "--no-progress",
    ]


def start_cli(tmp_path, args, name, env=None):
    out = open(tmp_path / f"{name}.out", "w")  # noqa: SIM115 - closed by the process' end
    err = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "meta_train.cli", "meta-train", *args],
        cwd=tmp_path,
        stdout=out,
        stderr=err,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # signals go to this learner only
    )


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_id_of(tmp_path, name):
    text = (tmp_path / f"{name}.out").read_text()
    for line in text.splitlines():
        if line.startswith("MLflow run "):
            return line.split()[2]
    return None


def local_checkpoint_steps(tmp_path, run_id):
    folder = tmp_path / "work" / run_id / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(s for p in folder.iterdir() if (s := ckpt.step_of(p.name)) is not None)


def reference_theta(config_data, steps, seed=0):
    config = build_config(config_data)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        theta, _ = train_local(
            config.make_optimizer(), config.make_family(), steps=steps, run_seed=seed,
            unroll=config.unroll, meta_optim=config.meta_optim, meta_batch=2,
        )
    finally:
        torch.set_num_threads(previous)
    return theta.numpy()


def metric_steps(uri, run_id, key="meta/loss"):
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


# -- bad configuration: one line, exit 2 ------------------------------------------------------

BAD = [
    (["--optimizer", "adam"], "unknown optimizer 'adam'; known: hyperadam, rnnprop, dm"),
    (["--task", "cifar"], "unknown task 'cifar'; known: mnist, quadratic"),
    (["--steps", "-5"], r"steps must be >= 0, got -5"),
    (["--workers", "-1"], r"workers must be >= 1, got -1"),
    (["--meta-batch", "0"], r"meta_batch must be >= 1, got 0"),
    (["--staleness", "-1"], r"staleness must be >= 0, got -1"),
    (["--checkpoint-every", "-2"], r"checkpoint_every must be >= 0, got -2"),
    (["--ray-address", "127.0.0.1:1"], r"cannot reach the Ray cluster at 127.0.0.1:1: "),
    (["--ray-address", "nowhere"], r"Ray address must be auto, HOST:PORT or ray://HOST:PORT"),
    (["--resume", "0123456789abcdef"], r"unknown run id '0123456789abcdef' in sqlite:///"),
    (["--config", "missing.json"], r"config file 'missing.json' not found"),
    (["--config", "bad.json"], r"unknown config field\(s\): unroll.horizonn"),
    (["--config", "bad.yaml"], r"config file 'bad.yaml' must end in .json or .toml"),
    (["--task", "mnist", "--data-dir", "no-such-dir"], r"MNIST IDX files missing in "),
    (["--tracking-uri", "bogus://x"], r"cannot open the MLflow store bogus://x: "),
    (["--allow-restart"], r"--allow-restart applies to --resume"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_configuration_is_one_line_and_exit_2(tracking_uri, tmp_path, capsys, args, message):
    write_json(tmp_path / "bad.json", {"unroll": {"horizonn": 3}})
    base = ["meta-train", "--task", "quadratic", "--tracking-uri", tracking_uri, "--no-progress"]
    assert cli.main(base + args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("hyperadam: error: ")
    assert __import__("re").search(message, err), err


# -- a whole run, in-process -------------------------------------------------------------------


@pytest.mark.slow  # meta-training through the CLI on a Ray cluster
def test_run_logs_config_metrics_validation_checkpoints_and_theta(
    ray_address, tracking_uri, tmp_path, capsys
):
    config = {
        "task": "quadratic",
        "num_candidates": 4,
        "unroll": {"horizon": 6, "truncation": 2},
        "validation": {"runs": 1, "steps": 5, "every": 3},
    }
    args = common_args(tmp_path, ray_address, tracking_uri, config)
    rc = cli.main(["meta-train", *args, "--steps", "6", "--checkpoint-every", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    run_id = out.split("MLflow run ")[1].split()[0]
    assert f"run {run_id} finished at step 6/6" in out
    assert f"mlflow ui --backend-store-uri {tracking_uri}" in out

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optimizer"] == "hyperadam" and params["unroll.meta_loss"] == "mean"
    assert params["family.dim"] == "10" and params["meta_batch"] == "2"
    assert len(params["family_digest"]) == 64 and len(params["config_digest"]) == 64
    assert "steps" not in params and "workers" not in params  # may change on resume
    assert run.data.tags["hyperadam.last_step"] == "6"
    assert metric_steps(tracking_uri, run_id) == list(range(6))
    for key in ("learner/rejected_grads", "learner/staleness_max", "throughput/inner_steps_per_s"):
        assert metric_steps(tracking_uri, run_id, key) == list(range(6))
    assert metric_steps(tracking_uri, run_id, "validation/score") == [3, 6]

    def files(path=None):
        out = []
        for info in client.list_artifacts(run_id, path):
            out += files(info.path) if info.is_dir else [info.path]
        return out

    assert set(files()) == {
        "config/run_config.json", "config/family.json",
        "checkpoints/step-00000003.ckpt", "checkpoints/step-00000006.ckpt",
        "theta/final/theta.npz", "theta/best/theta.npz",
        "plots/meta_training.png",
    }
    final = ckpt.load(client.download_artifacts(run_id, "checkpoints/step-00000006.ckpt",
                                                 str(tmp_path)))
    artifact = load_theta(client.download_artifacts(run_id, "theta/final/theta.npz",
                                                    str(tmp_path)))
    assert artifact.method == "hyperadam"
    assert artifact.meta["mlflow_run_id"] == run_id and artifact.meta["step"] == 6
    assert artifact.meta["task_digest"] == params["family_digest"]
    assert final.step == 6 and final.best.step in (3, 6)
    expected = reference_theta(config, 6)
    assert np.array_equal(final.learner.theta, expected)
    assert np.array_equal(np.concatenate([a.reshape(-1) for a in artifact.theta.values()]),
                          expected)


# -- killed learners ---------------------------------------------------------------------------


@pytest.mark.slow  # meta-training through the CLI on a Ray cluster
def test_sigkill_of_the_learner_then_resume_continues_exactly(
    ray_address, tracking_uri, tmp_path
):
    args = common_args(tmp_path, ray_address, tracking_uri)
    steps = ["--steps", "25", "--checkpoint-every", "5", "--seed", "3"]
    proc = start_cli(tmp_path, args + steps, "first")
    try:
        run_id = wait_for(lambda: run_id_of(tmp_path, "first"), 120, "the run id")
        wait_for(lambda: any(s >= 10 for s in local_checkpoint_steps(tmp_path, run_id)), 120,
                 "a checkpoint at step 10")
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Steps after the last checkpoint may be on the server or still in the local spool.
    assert len(metric_steps(tracking_uri, run_id)) < 25

    # A resume whose config differs names the fields and changes nothing.
    resume = ["--resume", run_id, "--ray-address", ray_address, "--tracking-uri", tracking_uri,
              "--work-dir", str(tmp_path / "work"), "--no-progress"]
    wrong = subprocess.run(
        [sys.executable, "-m", "meta_train.cli", "meta-train", *resume, "--optimizer", "rnnprop"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert wrong.returncode == 2
    assert wrong.stderr.count("\n") == 1
    assert wrong.stderr == (
        f"hyperadam: error: cannot resume run {run_id}: the config differs from the run's in "
        "optimizer (run: hyperadam, given: rnnprop)\n"
    )

    done = subprocess.run(
        [sys.executable, "-m", "meta_train.cli", "meta-train", *resume],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"run {run_id} finished at step 25/25" in done.stdout
    final = ckpt.load(tmp_path / "work" / run_id / "checkpoints" / ckpt.checkpoint_name(25))
    assert np.array_equal(final.learner.theta, reference_theta(SLOW_QUADRATIC, 25, seed=3))
    # One continuous history: every step exactly once, across the kill.
    assert metric_steps(tracking_uri, run_id) == list(range(25))
    assert len(final.history.meta_loss) == 25
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow  # meta-training through the CLI on a Ray cluster
def test_ctrl_c_writes_a_checkpoint_and_exits_130(ray_address, tracking_uri, tmp_path):
    args = common_args(tmp_path, ray_address, tracking_uri)
    proc = start_cli(tmp_path, args + ["--steps", "200", "--checkpoint-every", "0"], "sigint")
    try:
        run_id = wait_for(lambda: run_id_of(tmp_path, "sigint"), 120, "the run id")
        wait_for(lambda: len(metric_steps(tracking_uri, run_id)) >= 3, 120, "three steps")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = local_checkpoint_steps(tmp_path, run_id)
    assert len(saved) == 1 and 3 <= saved[0] < 200
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["hyperadam.last_step"] == str(saved[0])
    assert f"interrupted at step {saved[0]}" in (tmp_path / "sigint.err").read_text()
    listed = MlflowClient(tracking_uri).list_artifacts(run_id, "checkpoints")
    assert [f.path for f in listed] == [f"checkpoints/{ckpt.checkpoint_name(saved[0])}"]


@pytest.mark.slow  # ≈ 40-80 s here, most of it two start-ups of `mlflow server`
def test_tracking_server_outage_loses_nothing(ray_address, mlflow_server, tmp_path):
    uri = mlflow_server.url
    client = MlflowClient(uri)
    client.create_experiment(EXPERIMENT)
    args = common_args(tmp_path, ray_address, uri)
    # Fail fast instead of MLflow's minutes of HTTP retries: the tracker retries on its own.
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = start_cli(tmp_path, args + ["--steps", "30", "--checkpoint-every", "5"], "outage", env)
    try:
        run_id = wait_for(lambda: run_id_of(tmp_path, "outage"), 120, "the run id")
        wait_for(lambda: len(metric_steps(uri, run_id)) >= 3, 120, "metrics on the server")
        mlflow_server.stop()
        # Training goes on while the server is away: checkpoints keep coming, locally.
        wait_for(lambda: any(s >= 15 for s in local_checkpoint_steps(tmp_path, run_id)), 120,
                 "a checkpoint written during the outage")
        time.sleep(1.0)
        mlflow_server.start()
        assert proc.wait(timeout=300) == 0, (tmp_path / "outage.err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert metric_steps(uri, run_id) == list(range(30))
    listed = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    assert listed == [f"checkpoints/{ckpt.checkpoint_name(s)}" for s in range(5, 31, 5)]
    assert client.get_run(run_id).info.status == "FINISHED"
    final = ckpt.load(client.download_artifacts(run_id, "checkpoints/step-00000030.ckpt",
                                                 str(tmp_path)))
    assert final.step == 30
    assert not any((tmp_path / "work" / "spool" / run_id / "files").iterdir())


def test_progress_bar_shows_step_loss_validation_and_throughput():
    import io

    from meta_train.progress import ProgressBar

    stream = io.StringIO()  # not a terminal: one full line per draw
    bar = ProgressBar(10, stream=stream, log_interval_s=0)
    bar.update(1, 0.5, 40)
    bar.set_validation(0.3, 0.25)
    bar.update(10, 0.4, 40)
    bar.close()
    first, last = stream.getvalue().splitlines()
    assert first.startswith("step 1/10 [##") and "meta-loss 0.5000 | val - |" in first
    assert last.startswith("step 10/10 [" + "#" * 24 + "]")
    assert "val 0.3000 (best 0.2500)" in last and "inner steps/s | eta 0:00" in last


@pytest.mark.slow  # meta-training through the CLI on a Ray cluster
def test_a_checkpoint_file_continues_exactly_in_a_new_store(ray_address, tracking_uri, tmp_path):
    """The committed-checkpoint path: the original store is gone, only the file remains."""
    args = common_args(tmp_path, ray_address, tracking_uri)
    first = subprocess.run(
        [sys.executable, "-m", "meta_train.cli", "meta-train", *args,
         "--steps", "10", "--checkpoint-every", "5", "--seed", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert first.returncode == 0, first.stderr
    run_id = run_id_of_text(first.stdout)
    kept = tmp_path / "kept.ckpt"
    kept.write_bytes(
        (tmp_path / "work" / run_id / "checkpoints" / ckpt.checkpoint_name(10)).read_bytes()
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    new_store = f"sqlite:///{elsewhere / 'mlflow.db'}"
    again = ["--from-checkpoint", str(kept), "--ray-address", ray_address,
             "--tracking-uri", new_store, "--work-dir", str(elsewhere / "work"), "--no-progress"]
    wrong = subprocess.run(
        [sys.executable, "-m", "meta_train.cli", "meta-train", *again, "--seed", "4"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120,
    )
    assert wrong.returncode == 2
    assert wrong.stderr == (
        f"hyperadam: error: cannot continue from {kept}: the config differs from the "
        "checkpoint's in seed (run: 3, given: 4)\n"
    )
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(kept.read_bytes()[:-10])
    bad = subprocess.run(
        [sys.executable, "-m", "meta_train.cli", "meta-train", *again[:1], str(broken),
         *again[2:]],
        cwd=elsewhere, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("hyperadam: error: cannot continue from the checkpoint: ")
    assert "truncated or altered" in bad.stderr and bad.stderr.count("\n") == 1

    done = subprocess.run(
        [sys.executable, "-m", "meta_train.cli", "meta-train", *again, "--steps", "25",
         "--workers", "1"],
        cwd=elsewhere, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    new_id = run_id_of_text(done.stdout)
    assert new_id != run_id
    final = ckpt.load(elsewhere / "work" / new_id / "checkpoints" / ckpt.checkpoint_name(25))
    assert np.array_equal(final.learner.theta, reference_theta(SLOW_QUADRATIC, 25, seed=3))
    assert len(final.history.meta_loss) == 25  # the plot keeps the whole history
    tags = MlflowClient(new_store).get_run(new_id).data.tags
    assert tags["hyperadam.continued_from_run"] == run_id
    assert tags["hyperadam.continued_from_step"] == "10"
    assert metric_steps(new_store, new_id) == list(range(10, 25))


def run_id_of_text(stdout: str) -> str:
    return next(line.split()[2] for line in stdout.splitlines() if line.startswith("MLflow run "))


def test_a_continued_checkpoint_may_validate_differently_and_restarts_its_best():
    """Validation does not steer θ: a new run may validate on another seed, but then the old
    best θ and validation curve (measured the old way) must not carry over."""
    from meta_train.errors import UsageError
    from meta_train.meta_training import _continued_config, validation_restarted
    from meta_train.run_config import identity_params

    kept = ckpt.load(Path(__file__).parents[2] / "checkpoints" / "hyperadam-seed0-step8774.ckpt")
    assert kept.best is not None and kept.history.validation_loss
    refusal = "differs in "
    identity = identity_params(kept.config)
    same = _continued_config(kept.config, [], identity, refusal, free=("validation.",))
    assert validation_restarted(kept, same) == (kept, False)

    seed = kept.config["validation"]["seed"] + 1
    other = _continued_config(
        kept.config, [{"validation": {"seed": seed}}], identity, refusal, free=("validation.",)
    )
    continued, restarted = validation_restarted(kept, other)
    assert restarted and continued.best is None
    assert continued.history.validation_steps == continued.history.validation_loss == ()
    assert continued.history.meta_loss == kept.history.meta_loss
    assert continued.learner is kept.learner  # θ and the trajectories go on untouched

    with pytest.raises(UsageError, match=r"differs in validation.seed"):
        _continued_config(kept.config, [{"validation": {"seed": seed}}], identity, refusal)
    with pytest.raises(UsageError, match=r"differs in seed \(run: 0, given: 4\)"):
        _continued_config(kept.config, [{"seed": 4}], identity, refusal, free=("validation.",))

    # The score is validation too (an experiment's): in either layout it restarts the best θ.
    from meta_train.meta_training import VALIDATION_FREE

    for layer in ({"experimental": {"validation_score": "adam_ratio"}},
                  {"validation": {"score": "adam_ratio"}}):
        ratio = _continued_config(kept.config, [layer], identity, refusal, free=VALIDATION_FREE)
        assert ratio.experimental.validation_score == "adam_ratio"
        assert validation_restarted(kept, ratio)[1]


# -- failures after the run exists: FAILED, one line, exit 2 ------------------------------------

FAST_QUADRATIC = {
    "task": "quadratic",
    "num_candidates": 4,
    "unroll": {"horizon": 6, "truncation": 2},
    "validation": {"every": 0},
}


def run_statuses(uri):
    client = MlflowClient(uri)
    return [r.info.status for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])]


def test_an_unusable_work_dir_is_one_line_and_leaves_no_running_run(
    ray_address, tracking_uri, tmp_path, capsys
):
    args = common_args(tmp_path, ray_address, tracking_uri, FAST_QUADRATIC)
    rc = cli.main(["meta-train", *args, "--steps", "2", "--work-dir", "/proc/hyperadam/work"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (
        "hyperadam: error: cannot use --work-dir /proc/hyperadam/work: No such file or "
        "directory: /proc/hyperadam\n"
    )
    assert "RUNNING" not in run_statuses(tracking_uri)


def misfit_checkpoint(path, *, theta_size=None, slots=2):
    """A checkpoint whose file verifies but whose θ or slot count does not fit its config."""
    from meta_train.learner import LearnerState

    config = build_config(FAST_QUADRATIC, {"workers": 2, "meta_batch": 2}).resolve(2)
    size = config.make_optimizer().num_meta_parameters() if theta_size is None else theta_size
    state = LearnerState(4, np.zeros(size, np.float32), {}, (None,) * slots)
    ckpt.save(path, ckpt.Checkpoint(config.to_dict(), state, run_id="r0"))
    return path, config.make_optimizer().num_meta_parameters()


@pytest.mark.parametrize("misfit", ["theta", "slots"])
def test_a_checkpoint_that_does_not_fit_its_config_is_refused_before_a_run_exists(
    ray_address, tracking_uri, tmp_path, capsys, misfit
):
    path, size = misfit_checkpoint(
        tmp_path / "misfit.ckpt", **({"theta_size": 5} if misfit == "theta" else {"slots": 3})
    )
    args = common_args(tmp_path, ray_address, tracking_uri, FAST_QUADRATIC)[2:]  # no --config
    rc = cli.main(["meta-train", *args, "--from-checkpoint", str(path), "--steps", "6"])
    err = capsys.readouterr().err
    assert rc == 2
    expected = (
        f"the state's θ has shape (5,), hyperadam needs ({size},)" if misfit == "theta"
        else "the state has 3 slots, the config's meta_batch is 2"
    )
    assert err == f"hyperadam: error: cannot continue the checkpoint of step 4: {expected}\n"
    assert "RUNNING" not in run_statuses(tracking_uri)


def test_a_failure_during_training_ends_the_run_failed_with_one_line(
    ray_address, tracking_uri, tmp_path, capsys, monkeypatch
):
    """A full disk at the first checkpoint: the run must end FAILED, not RUNNING or FINISHED."""
    import errno

    def disk_full(path, checkpoint):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "save", disk_full)
    args = common_args(tmp_path, ray_address, tracking_uri, FAST_QUADRATIC)
    rc = cli.main(["meta-train", *args, "--steps", "4", "--checkpoint-every", "2"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith("hyperadam: error: No space left on device: ")
    assert captured.err.count("\n") == 1 and "step-00000002.ckpt" in captured.err
    run_id = captured.out.split("MLflow run ")[1].split()[0]
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FAILED"


def test_a_nan_checkpoint_is_refused_with_one_line(ray_address, tracking_uri, tmp_path, capsys):
    path, size = misfit_checkpoint(tmp_path / "nan.ckpt")
    data = ckpt.load(path)
    theta = np.full(size, np.nan, np.float32)
    ckpt.save(path, ckpt.Checkpoint(data.config, dataclasses.replace(data.learner, theta=theta),
                                    run_id="r0"))
    args = common_args(tmp_path, ray_address, tracking_uri, FAST_QUADRATIC)[2:]
    assert cli.main(["meta-train", *args, "--from-checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "hyperadam: error: cannot continue from the checkpoint: checkpoint "
        f"{str(path)!r} holds {size} non-finite values in 'theta'\n"
    )
    assert run_statuses(tracking_uri) == []


# -- --resume takes the newest valid copy, local or MLflow ---------------------------------------


def test_resume_takes_the_newest_valid_copy_and_refuses_when_none_verifies(
    ray_address, tracking_uri, tmp_path, capsys
):
    args = common_args(tmp_path, ray_address, tracking_uri, FAST_QUADRATIC)
    assert cli.main(["meta-train", *args, "--steps", "10", "--checkpoint-every", "5"]) == 0
    run_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    local = tmp_path / "work" / run_id / "checkpoints"
    assert local_checkpoint_steps(tmp_path, run_id) == [5, 10]
    newest = local / ckpt.checkpoint_name(10)
    newest.write_bytes(newest.read_bytes()[:-7])  # the local copy of the newest is broken

    resume = ["meta-train", "--resume", run_id, "--ray-address", ray_address,
              "--tracking-uri", tracking_uri, "--work-dir", str(tmp_path / "work"),
              "--no-progress"]
    assert cli.main([*resume, "--steps", "12"]) == 0
    captured = capsys.readouterr()
    assert f"MLflow run {run_id} resumed at step 10" in captured.out  # MLflow's copy of step 10
    assert "skipping a bad checkpoint (local)" in captured.err
    final = ckpt.load(local / ckpt.checkpoint_name(12))
    assert np.array_equal(final.learner.theta, reference_theta(FAST_QUADRATIC, 12))

    # Every copy broken, local and in MLflow: an error, not a silent restart at step 0.
    stored = tmp_path / "artifacts"
    broken = [p for p in [*local.iterdir(), *stored.rglob("*.ckpt")] if ckpt.step_of(p.name)]
    assert len(broken) >= 4
    for path in broken:
        path.write_bytes(b"HYPERADAM-CKPT\n" + b"\0" * 20)
    assert cli.main([*resume, "--steps", "14"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"hyperadam: error: run {run_id} has 3 checkpoint step(s) but no copy")
    assert err.endswith("--allow-restart starts it again from step 0")
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"  # untouched

    assert cli.main([*resume, "--steps", "2", "--allow-restart"]) == 0
    assert f"MLflow run {run_id} resumed at step 0" in capsys.readouterr().out


# -- the store: read-only commands never create one; messages name its absolute path ----------

READ_ONLY = [
    ["registry", "list"],
    ["registry", "promote", "hyperadam", "--version", "1"],
    ["export", "--run", "0123456789abcdef", "--out", "exported"],
    ["meta-train", "--resume", "0123456789abcdef", "--no-progress"],
]


@pytest.mark.parametrize("command", READ_ONLY, ids=[" ".join(c[:2]) for c in READ_ONLY])
def test_read_only_commands_never_create_a_store(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(command) == 2
    db = tmp_path / "mlflow.db"
    assert capsys.readouterr().err == (
        f"hyperadam: error: no MLflow store at {db} (sqlite:///{db}); pass --tracking-uri or "
        "set MLFLOW_TRACKING_URI to the store your runs are in\n"
    )
    assert not db.exists() and not (tmp_path / "exported").exists()


def test_messages_name_the_store_by_its_absolute_path(tracking_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: ./mlflow.db
    assert cli.main(["registry", "list"]) == 0
    assert capsys.readouterr().out == f"no registered optimizers in sqlite:///{tmp_path}/mlflow.db\n"
    assert cli.main(["export", "--run", "0123456789abcdef", "--out", "exported"]) == 2
    assert capsys.readouterr().err == (
        f"hyperadam: error: unknown run id '0123456789abcdef' in sqlite:///{tmp_path}/mlflow.db\n"
    )


# -- a short run says what it is ---------------------------------------------------------------


def test_the_eta_leaves_out_the_first_steps_start_up():
    import io

    from meta_train.progress import ProgressBar

    now = [0.0]
    stream = io.StringIO()
    bar = ProgressBar(100, stream=stream, log_interval_s=0, clock=lambda: now[0])
    now[0] = 30.0  # the first step: starting workers, building tasks
    bar.update(1, 0.5, 40)
    now[0] = 31.0  # then 0.5 s per step
    bar.update(3, 0.5, 80)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("eta ?")  # unknown yet, not 99 × 30 s
    assert second.endswith("eta 0:48")  # 97 steps × 0.5 s


def test_a_short_run_ends_by_saying_so_and_pointing_to_trained_optimizers(
    ray_address, tracking_uri, tmp_path, capsys
):
    args = common_args(tmp_path, ray_address, tracking_uri, FAST_QUADRATIC)
    assert cli.main(["meta-train", *args, "--steps", "2"]) == 0
    last = capsys.readouterr().out.splitlines()[-3:]
    assert last[0].startswith("note: 2 meta-updates is a short run")
    assert "is not expected to beat Adam" in last[0]
    assert "--optimizer hyperadam" in last[1] and "runtime.load('hyperadam')" in last[1]
    assert last[2].startswith("  a longer run: hyperadam meta-train --optimizer hyperadam --steps")

    from meta_train.commands.meta_train_cmd import SHORT_RUN_STEPS, describe
    from meta_train.meta_training import RunSummary

    long = RunSummary("r", "0", tracking_uri, SHORT_RUN_STEPS, SHORT_RUN_STEPS, False, True,
                      None, tmp_path, tmp_path)
    assert "short run" not in describe(long)


# -- a Ray cluster of the user's already runs on the machine -------------------------------------


@pytest.fixture
def users_ray_cluster(tmp_path):
    """`ray start --head` on 127.0.0.1, as Ray users often leave running; its files live in a
    private RAY_TMPDIR, so only processes given that folder can see it. Stopped by process
    group, never with `ray stop` (which stops every Ray cluster of this user)."""
    import shutil
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", "--port=0", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (ray_tmp / "ray" / "ray_current_cluster").is_file() or head.poll(),
                 180, "the user's Ray head")
        assert head.poll() is None, (tmp_path / "ray-head.log").read_text()
        yield ray_tmp
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow  # ≈ 40-60 s: a Ray head, then a private local cluster beside it
def test_default_meta_train_starts_a_private_cluster_beside_a_running_one(
    users_ray_cluster, tracking_uri, tmp_path
):
    """No --ray-address: a cluster already running must neither be joined (Ray refuses our CPU
    count and the run dies) nor make Ray warn that it chose token authentication."""
    env = {**os.environ, "RAY_TMPDIR": str(users_ray_cluster), "HOME": str(tmp_path / "home"),
           "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # Ray's own defaults, as a new user has them
        env.pop(name, None)
    config = write_json(tmp_path / "fast.json", FAST_QUADRATIC)
    done = subprocess.run(
        [sys.executable, "-m", "meta_train.cli", "meta-train", "--config", str(config),
         "--steps", "2", "--workers", "1", "--tracking-uri", tracking_uri,
         "--work-dir", str(tmp_path / "work"), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "finished at step 2/2" in done.stdout
    assert "Token authentication is enabled" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", READ_ONLY[:3], ids=[" ".join(c[:2]) for c in READ_ONLY[:3]])
def test_an_unusable_tracking_uri_is_one_line(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*command, "--tracking-uri", "bogus://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyperadam: error: cannot open the MLflow store bogus://x: ")
    assert err.count("\n") == 1
