"""The snapshot gate keeps the newest meta-training snapshot that holds its start's long runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from meta_train import benchmark, cli
from meta_train.snapshot_gate import GateConfig, gate_snapshots, passes
from runtime.theta import load_theta, save_theta

ROOT = Path(__file__).resolve().parents[2]
START = str(ROOT / "checkpoints" / "ablation" / "tensor-trend-annealed-start" / "theta.npz")


def _snapshot(tmp_path, updates: int, *, ascend: bool = False, nudge: float = 0.0, name=None):
    start = load_theta(START)
    theta = dict(start.theta)
    theta["pre_bias"] = theta["pre_bias"] + nudge  # another θ, the same step size
    if ascend:  # ρ < 0: every step goes up the gradient
        theta["weight_bias"] = -theta["weight_bias"]
    return save_theta(
        tmp_path / (name or f"theta-{updates:06d}.npz"), start.method, theta, updates=updates
    )


def _record(final: float, *, diverged: bool = False) -> benchmark.RunRecord:
    return benchmark.RunRecord([final], final, final, diverged, lowest_checkpoint=final)


def test_snapshots_are_tried_newest_first_and_the_first_to_pass_is_kept(tmp_path):
    paths = {u: _snapshot(tmp_path, u, nudge=u * 1e-3) for u in (10, 20, 30)}
    tried = []

    def run(task, spec, steps, seed):
        tried.append(spec.source)
        if spec.source == str(paths[30]):
            return _record(math.inf, diverged=True)
        return _record(1.0)

    config = GateConfig(tasks=("leastsq-cond1e6-10000",), runs=2)
    report = gate_snapshots([paths[10], paths[30], paths[20]], START, config, run=run)
    assert report["kept"] == str(paths[20])
    assert [s["updates"] for s in report["snapshots"]] == [30, 20]  # 10 never ran
    assert report["snapshots"][0]["tasks"]["leastsq-cond1e6-10000"]["unstable"] == 2
    assert tried == [START] * 2 + [str(paths[30])] * 2 + [str(paths[20])] * 2


def test_the_same_theta_under_two_names_runs_once(tmp_path):
    # The last snapshot is often the final θ file too: it is measured once.
    last = _snapshot(tmp_path, 30, nudge=0.03)
    final = _snapshot(tmp_path, 30, nudge=0.03, name="theta.npz")
    earlier = _snapshot(tmp_path, 20, nudge=0.02)
    tried = []

    def run(task, spec, steps, seed):
        tried.append(spec.source)
        return _record(9.0 if spec.source in (str(last), str(final)) else 1.0)

    report = gate_snapshots([final, last, earlier], START, GateConfig(), run=run)
    assert report["kept"] == str(earlier)
    entries = report["snapshots"]
    assert len(entries) == 3 and "same_as" in entries[1] and not entries[1]["passed"]
    assert len(tried) == 2 * 3  # the reference, one of the two names, the earlier snapshot


def test_a_snapshot_beyond_the_tolerance_of_the_reference_fails():
    reference = {"t": {"mean_final_loss": 1.0, "unstable": 0}}
    assert passes({"t": {"mean_final_loss": 1.5, "unstable": 0}}, reference, 1.5)
    assert not passes({"t": {"mean_final_loss": 1.51, "unstable": 0}}, reference, 1.5)
    assert not passes({"t": {"mean_final_loss": 0.5, "unstable": 1}}, reference, 1.5)
    assert not passes({"t": {"mean_final_loss": math.nan, "unstable": 0}}, reference, 1.5)


def test_no_snapshot_passing_keeps_none(tmp_path):
    path = _snapshot(tmp_path, 5)

    def run(task, spec, steps, seed):
        return _record(1.0 if spec.source == START else 2.0)

    report = gate_snapshots([path], START, GateConfig(tasks=("logreg-cond1e5-10000",)), run=run)
    assert report["kept"] is None and report["snapshots"][0]["passed"] is False


@pytest.mark.parametrize(
    "kwargs, match",
    [({"tasks": ()}, "at least one task"), ({"runs": 0}, "runs"), ({"tolerance": 0.9}, "tolerance"),
     ({"tolerance": math.inf}, "tolerance")],
)  # fmt: skip
def test_a_bad_gate_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GateConfig(**kwargs)
    with pytest.raises(KeyError, match="unknown task"):
        GateConfig(tasks=("no-such-task",))


def test_a_snapshot_without_its_updates_or_of_another_method_is_refused(tmp_path):
    start = load_theta(START)
    bare = save_theta(tmp_path / "bare.npz", start.method, start.theta)
    with pytest.raises(ValueError, match="updates"):
        gate_snapshots([bare], START, run=lambda *a: _record(1.0))
    with pytest.raises(ValueError, match="no snapshots"):
        gate_snapshots([], START)


@pytest.mark.parametrize("engine", ["runtime", "reference"])
def test_the_gate_end_to_end_rejects_a_step_that_blows_up_and_keeps_the_earlier_snapshot(
    tmp_path, engine
):
    # Real runs (each task's quick horizon) through the exported ONNX step (the command's
    # default) and the torch reference: the newest snapshot's step climbs the loss.
    good = _snapshot(tmp_path, 100)
    broken = _snapshot(tmp_path, 200, ascend=True)
    keep, out = tmp_path / "kept" / "theta.npz", tmp_path / "gate.json"
    code = cli.main(
        ["snapshot-gate", "--reference", START, "--snapshots", str(good), str(broken),
         "--quick", "--tasks", "leastsq-cond1e6-10000", "--keep", str(keep), "--out", str(out),
         "--engine", engine]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0 and report["kept"] == str(good) and report["engine"] == engine
    first, second = report["snapshots"]
    assert (first["updates"], first["passed"]) == (200, False)
    assert first["tasks"]["leastsq-cond1e6-10000"]["unstable"] == 1
    assert second["passed"] and second["tasks"] == report["reference"]["tasks"]  # same θ, seeds
    assert second["identity"].endswith("/ort") == (engine == "runtime")
    assert keep.read_bytes() == good.read_bytes()
    assert report["config"]["quick"] is True


def test_bad_gate_input_is_a_one_line_error_and_keeps_nothing(tmp_path, capsys):
    good = _snapshot(tmp_path, 100)
    keep = tmp_path / "kept.npz"
    for argv, match in (
        (["--tasks", "no-such-task"], "unknown task"),
        (["--runs", "0"], "runs must be"),
        (["--engine", "reference", "--snapshots", str(tmp_path / "missing.npz")], "missing.npz"),
    ):
        args = ["snapshot-gate", "--reference", START, "--snapshots", str(good), "--quick",
                "--keep", str(keep), *argv]  # fmt: skip
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("hyperadam: error:") and match in err and err.count("\n") == 1
        assert not keep.exists()


def test_the_papers_tasks_can_gate_too(tmp_path):
    # The paper's 100-step ReLU MLP (where steps learned on sigmoid MLPs blew up) beside a
    # held-out task, through the exported step; each at its own horizon, or 20 steps if quick.
    assert GateConfig(tasks=("mnist-nn-relu-100",)).steps("mnist-nn-relu-100") == 100
    assert GateConfig(tasks=("mnist-nn-relu-100",), quick=True).steps("mnist-nn-relu-100") == 20
    good = _snapshot(tmp_path, 100)
    broken = _snapshot(tmp_path, 200, ascend=True)
    out = tmp_path / "gate.json"
    tasks = ["mnist-nn-relu-100", "leastsq-cond1e6-10000"]
    code = cli.main(
        ["snapshot-gate", "--reference", START, "--snapshots", str(good), str(broken),
         "--quick", "--tasks", *tasks, "--out", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0 and report["kept"] == str(good)
    rejected = report["snapshots"][0]
    assert set(rejected["tasks"]) == set(tasks) and not rejected["passed"]
    assert rejected["tasks"]["mnist-nn-relu-100"]["unstable"] == 1
