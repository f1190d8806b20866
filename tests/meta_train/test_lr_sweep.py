"""The lr sweep: a per-task step size's best on the paper's 100-step rows, on reproduce's runs."""

from __future__ import annotations

import json
import math

import pytest

from meta_train.lr_sweep import SweepConfig, hundred_step_rows, main, sweep
from meta_train.reproduce import evaluate_cell
from meta_train.tasks.suite import TEST_TASKS


def test_the_rows_are_the_papers_sixteen_hundred_step_rows_with_their_ratios():
    rows = hundred_step_rows()
    assert len(rows) == 16
    assert rows["mnist-nn-sigmoid-100"] == pytest.approx(0.33 / 0.35)
    assert rows["sin-lstm"] == pytest.approx(0.42 / 0.65)
    assert "mnist-cnn1-10000" not in rows


def test_the_best_finite_multiple_is_judged_against_adam_at_the_papers_lr():
    calls = []

    def fake(task, optimizer, lr, runs, seed):
        calls.append((optimizer, lr))
        # Adam at the paper's lr ends at 1.0; ×2 at 0.8; ×5 diverges.
        return {1.0: 1.0, 2.0: 0.8, 5.0: math.nan}[round(lr / adam_lr, 6)]

    adam_lr = TEST_TASKS["sin-lstm"].adam_lr
    result = sweep(SweepConfig("adam", (5, 2, 1), runs=3, tasks=("sin-lstm",)), fake)
    row = result["rows"]["sin-lstm"]
    assert row["best_multiple"] == 2.0 and row["best_ratio"] == pytest.approx(0.8)
    assert row["meets"] is False  # 0.8 > 0.42 / 0.65
    assert (result["met"], result["of"]) == (0, 1)
    # Adam ×1 is the reference itself: evaluated once, not twice.
    assert [lr / adam_lr for _, lr in calls] == pytest.approx([1.0, 2.0, 5.0])


def test_end_to_end_the_reference_is_the_adam_cell_of_reproduce_on_the_same_runs(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    args = ["--tasks", "mnist-nn-tanh-100", "--runs", "2", "--multipliers", "1", "1.5"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"]["mnist-nn-tanh-100"]
    cell = evaluate_cell("mnist-nn-tanh-100", "adam", runs=2, seed=0, data_dir=None)
    assert row["adam_final_loss"] == cell["final_loss_mean"]
    assert set(row["final_loss_by_multiple"]) == {"1.0", "1.5"}
    best = min(row["final_loss_by_multiple"].values())
    assert row["best_ratio"] == pytest.approx(best / cell["final_loss_mean"])
    assert "mnist-nn-tanh-100" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "mnist-cnn1-10000"], "not a 100-step paper row"),
        (["--multipliers", "0"], "multipliers must be positive"),
        (["--runs", "0"], "runs must be an integer >= 1"),
        (["--optimizer", "no/such/theta.npz"], "unknown optimizer"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
