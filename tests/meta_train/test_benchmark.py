"""``hyperadam benchmark --suite heldout``: the metrics, the Adam tuning, and the report's cells."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from meta_train import cli
from meta_train.benchmark import (
    EVAL_STREAM,
    TUNING_STREAM,
    BenchmarkConfig,
    iqm,
    paired_bootstrap,
    run_seed,
    run_task,
    smooth,
    speedup,
    tune_adam,
)
from meta_train.evaluate import checkpoint_steps
from meta_train.optimizers import make_baseline
from meta_train.tasks.base import Task
from meta_train.tasks.heldout import HELDOUT_FAST, HELDOUT_KEYS, heldout_spec


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    threads = torch.get_num_threads()
    try:
        code = cli.main(["benchmark", "--suite", "heldout", "--quick", "--optimizer",
                         "hyperadam", "--out", str(out / "docs"), "--tracking-uri", uri])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out / "docs", uri


def test_metrics_by_hand():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 100]) == pytest.approx(4.5)  # 2 trimmed from each end
    assert iqm([2.0]) == 2.0
    assert smooth([4, 2, 0, 2], 2) == [4, 3, 1, 1]
    assert speedup([5, 4, 3, 2], 3.5, 4) == {"adam_steps": 3, "speedup": 0.75, "adam_reaches": True}
    assert speedup([5, 4], 1.0, 2)["adam_reaches"] is False
    rng = np.random.default_rng(0)
    lo, hi = paired_bootstrap([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], rng)
    assert lo < 1.0 < hi and lo >= 0.5 and hi <= 1.5
    assert paired_bootstrap([1.0, 1.0], [2.0, 2.0], rng) == (0.5, 0.5)


def test_tuning_and_evaluation_seeds_are_disjoint():
    tuning = {run_seed(0, TUNING_STREAM, r) for r in range(100)}
    evaluation = {run_seed(0, EVAL_STREAM, r) for r in range(100)}
    assert not tuning & evaluation


def test_a_run_that_blows_up_is_unstable_and_a_good_one_is_not():
    task = heldout_spec("leastsq-cond1e6-10000").build()
    good = run_task(task, make_baseline("adam", 0.1), steps=200, seed=1)
    assert not good.unstable and not good.diverged and good.final_loss < good.smoothed[0]
    bad = run_task(task, make_baseline("sgd", 10.0), steps=200, seed=1)
    assert bad.diverged and bad.unstable and math.isinf(bad.final_loss)


class _NoisyBowl(Task):
    """L(w; b) = b·‖w‖²/2 with a minibatch factor b ~ U(0.1, 1.9): its mean is ‖w‖²/2, but
    the minibatch curve's lowest smoothed value sits far below the loss of any iterate."""

    name = "noisy-bowl"

    @property
    def num_params(self):
        return 4

    def init_params(self, generator):
        return torch.ones(4)

    def sample_batch(self, generator):
        return (0.1 + 1.8 * torch.rand((), generator=generator),)

    def loss(self, params, batch):
        return batch[0] * 0.5 * (params**2).sum()


class _DownThenUp:
    """Gradient descent for 100 steps, then ascent: a run that rises far above its best."""

    name = "down-then-up"

    def init(self, num_coords, *, device="cpu"):
        return 0

    def update(self, grad, t):
        return (-0.02 if t < 100 else 0.05) * grad, t + 1


def test_minibatch_noise_is_not_instability_but_a_rise_is():
    task = _NoisyBowl()
    # Adam with a vanishing step: every iterate has the same true loss; only the batches vary.
    still = run_task(task, make_baseline("adam", 1e-9), steps=200, seed=0)
    assert still.unstable_smoothed  # the first sittings' rule calls the noise unstable
    assert not still.unstable  # the iterates' own losses, measured alike, say it is not
    # A run that descends and then climbs back is unstable by both rules.
    rising = run_task(task, _DownThenUp(), steps=200, seed=0)
    assert rising.unstable and rising.lowest_checkpoint < rising.final_loss / 1.5


def test_checkpoint_measurements_leave_the_run_unchanged():
    task = heldout_spec("leastsq-cond1e6-10000").build()
    plain = run_task(task, make_baseline("adam", 0.03), steps=60, seed=2, checkpoints=0)
    measured = run_task(task, make_baseline("adam", 0.03), steps=60, seed=2)
    assert measured.final_loss == plain.final_loss  # bitwise: the same batches, the same steps
    assert measured.smoothed == plain.smoothed
    assert plain.lowest_checkpoint == plain.final_loss  # with none, the final iterate alone
    assert checkpoint_steps(100) == set(range(0, 100, 5)) and checkpoint_steps(7, 0) == set()


def test_the_adam_grid_widens_until_the_best_lr_is_inside():
    config = BenchmarkConfig(optimizers=(), runs=2, tuning_runs=1, grid=(-8, -7))
    tuned = tune_adam("leastsq-cond1e6-10000", 50, config)
    exponents = sorted(int(k) for k in tuned["scores"])
    assert exponents[0] == -8 and exponents[-1] > -7  # it grew upwards from 3e-4
    assert not tuned["at_edge"]
    assert tuned["best_exponent"] not in (exponents[0], exponents[-1])
    best = min(tuned["scores"].values())
    assert tuned["scores"][str(tuned["best_exponent"])] == best


@pytest.mark.slow  # the quick fixture runs the quick benchmark (≈ 100 s)
def test_quick_report_covers_every_task_and_logs_to_mlflow(quick):
    docs, uri = quick
    report = json.loads((docs / "generalisation.json").read_text())
    assert sorted(report["tasks"]) == sorted(HELDOUT_KEYS)  # the JSON is written key-sorted
    for name in ("generalisation.md", "figures/heldout-ratios.png", "figures/heldout-curves.png"):
        assert (docs / name).stat().st_size > 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("hyperadam-benchmark")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["hyperadam/iqm_ratio"] == pytest.approx(
        report["summary"]["overall"]["hyperadam"]["iqm_ratio"]
    )
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "generalisation.md", "generalisation.json", "figures"
    }


@pytest.mark.slow  # the quick fixture runs the quick benchmark (≈ 100 s)
def test_every_cell_is_traceable_to_the_json(quick):
    docs, _ = quick
    report = json.loads((docs / "generalisation.json").read_text())
    markdown = (docs / "generalisation.md").read_text()
    rows = [line for line in markdown.split("## Per task")[1].splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[5:] == ["hyperadam"]
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        key = cells[0]
        task = report["tasks"][key]
        adam = task["results"]["adam"]["final_losses"]
        opt = task["results"]["hyperadam"]["final_losses"]
        # The ratio is recomputed from the raw final losses of the same seeded runs.
        expected = (
            math.inf if None in opt else float(np.mean(opt)) / float(np.mean(adam))
        )
        # Each cell is the recomputed number as the document prints it (3 or 4 digits).
        ratio = re.findall(r"[\d.e+-]+|∞", cells[5].split("·")[0])[0]
        assert ratio == ("∞" if math.isinf(expected) else f"{expected:.3g}")
        assert cells[3].removesuffix(" (edge)") == f"{task['adam_tuning']['best_lr']:.3g}"
        adam_unstable = sum(task["results"]["adam"]["unstable"])
        assert cells[4] == f"{float(np.mean(adam)):.4g} · {adam_unstable}/{len(adam)}"
        unstable = cells[5].split("·")[2].strip()
        assert unstable == f"{sum(task['results']['hyperadam']['unstable'])}/{len(opt)}"
    summary = report["summary"]["overall"]["hyperadam"]
    ratios = [report["summary"]["per_task"][k]["hyperadam"]["ratio"] for k in report["tasks"]]
    assert summary["iqm_ratio"] == pytest.approx(iqm(ratios))
    assert summary["fraction_below_1"] == pytest.approx(np.mean([r < 1 for r in ratios]))
    fast = [report["summary"]["per_task"][k]["hyperadam"]["ratio"] for k in HELDOUT_FAST]
    assert report["summary"]["overall_fast"]["hyperadam"]["iqm_ratio"] == pytest.approx(iqm(fast))
    assert "On the fast subset (7 tasks" in markdown


@pytest.mark.slow  # the quick fixture runs the quick benchmark (≈ 100 s)
def test_merge_reuses_the_tuning_and_keeps_earlier_optimizers(quick, tmp_path, capsys):
    import shutil

    docs, _ = quick
    out = tmp_path / "docs"
    shutil.copytree(docs, out)
    before = json.loads((out / "generalisation.json").read_text())
    key = "leastsq-cond1e6-10000"
    code = cli.main(["benchmark", "--quick", "--merge", "--tasks", key, "--optimizer",
                     "hyperadam", "adam", "--out", str(out), "--tracking-uri", "none"])
    assert code == 0
    after = json.loads((out / "generalisation.json").read_text())
    assert list(after["tasks"]) == list(before["tasks"])  # the other tasks are kept
    assert after["tasks"][key]["adam_tuning"] == before["tasks"][key]["adam_tuning"]
    # The same θ on the same runs is not rerun: its numbers are the earlier ones, exactly.
    assert after["tasks"][key]["results"] == before["tasks"][key]["results"]


@pytest.mark.slow  # the quick fixture runs the quick benchmark (≈ 100 s)
def test_a_sitting_stopped_halfway_keeps_every_earlier_task(quick):
    from meta_train.benchmark import BenchmarkConfig, run_benchmark

    docs, _ = quick
    before = json.loads((docs / "generalisation.json").read_text())
    first, second = "rescnn-bn-mnist14-100", "leastsq-cond1e6-10000"
    saved = []

    def stop_after_the_first_task(report):
        saved.append(json.loads(json.dumps(report)))
        raise KeyboardInterrupt  # the sitting stops here; what was saved is all there is

    config = BenchmarkConfig(("hyperadam", "rnnprop"), tasks=(first, second), runs=2,
                             tuning_runs=1, quick=True)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config, before, progress=lambda _: None, on_task=stop_after_the_first_task)
    (partial,) = saved
    assert set(partial["tasks"]) == set(before["tasks"])  # nothing earlier is lost
    assert partial["tasks"][second] == before["tasks"][second]  # not reached: kept as it was
    assert "rnnprop" in partial["tasks"][first]["results"]  # reached: the new cells added
    assert partial["tasks"][first]["results"]["hyperadam"] == (
        before["tasks"][first]["results"]["hyperadam"]
    )


def test_bad_input_is_a_one_line_error(capsys, tmp_path):
    assert cli.main(["benchmark", "--quick", "--tasks", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task(s) nope" in capsys.readouterr().err
    assert cli.main(["benchmark", "--quick", "--runs", "1", "--out", str(tmp_path)]) == 2
    assert "--runs must be >= 2" in capsys.readouterr().err
    assert cli.main(["benchmark", "--optimizer", str(tmp_path / "missing.npz"),
                     "--out", str(tmp_path)]) == 2
    assert "missing.npz" in capsys.readouterr().err


def _cell(rng, scale, runs):
    """A stored result of ``runs`` runs whose final losses scatter around ``scale``."""
    losses = list(rng.uniform(0.5, 1.5, size=runs) * scale)
    return {"final_losses": losses, "unstable": [False] * runs, "final_smoothed": scale,
            "curve": {"steps": [1, 2], "loss": [2.0, 1.0]}}  # fmt: skip


def test_a_cells_ci_does_not_depend_on_the_other_optimizers_in_the_report():
    from meta_train.benchmark import summarise

    rng = np.random.default_rng(1)

    def result(scale):
        return _cell(rng, scale, runs=4)

    tasks = {
        f"t{i}": {"steps": 2, "results": {"adam": result(1.0), "hyperadam": result(1.2)}}
        for i in range(3)
    }
    alone = summarise({"tasks": tasks})
    for task in tasks.values():  # "aa" sorts first: a shared stream would draw for it first
        task["results"]["aa"] = result(0.8)
    together = summarise({"tasks": tasks})
    for key in tasks:
        assert together["per_task"][key]["hyperadam"] == alone["per_task"][key]["hyperadam"]
    assert together["overall"]["hyperadam"] == alone["overall"]["hyperadam"]


def test_the_iqm_ci_does_not_depend_on_the_order_of_the_tasks():
    from meta_train.benchmark import summarise

    rng = np.random.default_rng(2)

    def result(scale):
        return _cell(rng, scale, runs=3)

    tasks = {f"t{i}": {"steps": 2, "results": {"adam": result(1.0), "hyperadam": result(1.0 + i)}}
             for i in range(5)}  # fmt: skip
    forward = summarise({"tasks": tasks})["overall"]["hyperadam"]
    backward = summarise({"tasks": dict(reversed(list(tasks.items())))})["overall"]["hyperadam"]
    assert forward == backward


def test_a_cell_is_reused_only_for_the_same_theta_and_method(tmp_path):
    # The adaptive and trend variants' untrained starts are the same numbers under two methods
    # (two different steps): a θ file replaced by the other at the same path has the same label
    # and θ digest, and its stored cell must not be taken for the new one's.
    import shutil

    from meta_train.benchmark import run_benchmark

    ablation = "checkpoints/ablation"
    theta = tmp_path / "start" / "theta.npz"
    theta.parent.mkdir()
    key = "logreg-cond1e5-10000"
    config = BenchmarkConfig((str(theta),), tasks=(key,), runs=2, tuning_runs=1, quick=True)
    shutil.copy(f"{ablation}/tensor-adaptive-start/theta.npz", theta)
    first = run_benchmark(config, None, progress=lambda _: None)
    (label,) = [k for k in first["tasks"][key]["results"] if k != "adam"]
    cell = first["tasks"][key]["results"][label]
    assert cell["method"] == "hyperadam-tensor-adaptive"
    again = run_benchmark(config, json.loads(json.dumps(first)), progress=lambda _: None)
    assert again["tasks"][key]["results"][label] == cell  # same θ and method: reused as it was
    shutil.copy(f"{ablation}/tensor-trend-start/theta.npz", theta)
    trend = run_benchmark(config, json.loads(json.dumps(first)), progress=lambda _: None)
    rerun = trend["tasks"][key]["results"][label]
    assert rerun["identity"] == cell["identity"]  # the same numbers…
    assert rerun["method"] == "hyperadam-tensor-trend"  # …run again by their own step
    assert rerun["final_losses"] != cell["final_losses"]
    # A cell stored before cells recorded their method is of a method that existed then.
    legacy = {k: v for k, v in cell.items() if k != "method"}
    first["tasks"][key]["results"][label] = legacy
    assert run_benchmark(config, first, progress=lambda _: None)["tasks"][key]["results"][
        label
    ]["method"] == "hyperadam-tensor-trend"


@pytest.fixture
def one_thread():
    # The sittings ran one torch thread per run (a convolution's sums follow the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_committed_report_reproduces_bitwise(one_thread):
    # docs/generalisation.json's numbers come from run_task; rerunning two of its cells (tuned
    # Adam and a θ through the torch reference) must give the same final and checkpoint losses.
    from meta_train.benchmark import Unit, _run_unit, describe_optimizer

    root = Path(__file__).resolve().parents[2]
    report = json.loads((root / "docs" / "generalisation.json").read_text())
    key = "rescnn-bn-mnist14-100"
    cell = report["tasks"][key]
    seeds = [run_seed(cell["seed"], EVAL_STREAM, r) for r in range(cell["runs"])]
    theta = root / "checkpoints" / "ablation" / "tensor-trend-start" / "theta.npz"
    learned = describe_optimizer(str(theta))
    for label, spec, lr in (
        ("adam", describe_optimizer("adam"), cell["results"]["adam"]["lr"]),
        (learned.label, learned, None),
    ):
        stored = cell["results"][label]
        records = [_run_unit(Unit(key, cell["steps"], spec, lr, seed)) for seed in seeds]
        assert [r.final_loss for r in records] == stored["final_losses"], label
        assert [r.lowest_checkpoint for r in records] == stored["lowest_checkpoint"], label
        assert [r.unstable for r in records] == stored["unstable"], label
