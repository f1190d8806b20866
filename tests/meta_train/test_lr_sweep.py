"""The lr sweep: a per-task step size's best on the paper's 100-step rows, on reproduce's runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from meta_train.ablation import FROM_DECAYS
from meta_train.cli import main as cli_main
from meta_train.lr_sweep import SweepConfig, hundred_step_rows, merge_tables, sweep
from meta_train.reproduce import evaluate_cell
from meta_train.tasks.suite import TEST_TASKS

REPO = Path(__file__).resolve().parents[2]
DECAYS_THETA = REPO / FROM_DECAYS["start_theta"]  # a committed per-tensor θ


def test_the_rows_are_the_papers_sixteen_hundred_step_rows_with_their_ratios():
    rows = hundred_step_rows()
    assert len(rows) == 16
    assert rows["mnist-nn-sigmoid-100"] == pytest.approx(0.33 / 0.35)
    assert rows["sin-lstm"] == pytest.approx(0.42 / 0.65)
    assert "mnist-cnn1-10000" not in rows


def test_the_best_finite_multiple_is_judged_against_adam_at_the_papers_lr():
    calls = []

    def fake(task, optimizer, lr, runs, seed, folder):
        calls.append((optimizer, lr))
        assert folder is None  # the torch reference
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
    assert cli_main(["lr-sweep", *args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"]["mnist-nn-tanh-100"]
    cell = evaluate_cell("mnist-nn-tanh-100", "adam", runs=2, seed=0, data_dir=None)
    assert row["adam_final_loss"] == cell["final_loss_mean"]
    assert set(row["final_loss_by_multiple"]) == {"1.0", "1.5"}
    best = min(row["final_loss_by_multiple"].values())
    assert row["best_ratio"] == pytest.approx(best / cell["final_loss_mean"])
    assert "mnist-nn-tanh-100" in capsys.readouterr().out
    assert result["engine"] == "reference"


def test_a_theta_file_steps_through_its_export_under_the_runtime_engine(tmp_path):
    # A θ file, exported by the command, on one row at 2 runs: through its ONNX step the losses
    # agree with the torch reference's, and are not the reference's bit for bit (another engine
    # stepped). Adam is the same cell under both engines. The two steps agree to fp32 round-off
    # per step, which some trajectories amplify (the built-in's tanh MLP: 1e-7 at step 10, 3 %
    # at step 100), so the row is one whose trajectories do not (the sine LSTM).
    results, key = {}, "sin-lstm"
    for engine in ("reference", "runtime"):
        out = tmp_path / f"{engine}.json"
        args = ["lr-sweep", "--optimizer", str(DECAYS_THETA), "--tasks", key, "--runs", "2"]
        args += ["--multipliers", "1", "--engine", engine, "--out", str(out)]
        assert cli_main(args) == 0
        results[engine] = json.loads(out.read_text())
    reference, runtime = (results[e]["rows"][key] for e in results)
    assert results["runtime"]["engine"] == "runtime"
    assert runtime["adam_final_loss"] == reference["adam_final_loss"]
    ours, theirs = (
        runtime["final_loss_by_multiple"]["1.0"],
        reference["final_loss_by_multiple"]["1.0"],
    )
    assert ours == pytest.approx(theirs, rel=1e-4) and ours != theirs


def test_the_runtime_engine_is_passed_the_export_and_adam_never_is():
    seen = []

    def fake(task, optimizer, lr, runs, seed, folder):
        seen.append((optimizer, folder))
        return 1.0

    sweep(SweepConfig("hyperadam", (1, 2), runs=1, tasks=("sin-lstm",)), fake, folder="EXPORT")
    assert seen == [("adam", None), ("hyperadam", "EXPORT"), ("hyperadam", "EXPORT")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "mnist-cnn1-10000"], "not a 100-step paper row"),
        (["--multipliers", "0"], "multipliers must be positive"),
        (["--runs", "0"], "runs must be an integer >= 1"),
        (["--optimizer", "no/such/theta.npz"], "unknown optimizer"),
        (["--optimizer", "no/such/theta.npz", "--engine", "runtime"], "unknown optimizer"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(args, message, capsys, tmp_path):
    out = tmp_path / "sweep.json"
    assert cli_main(["lr-sweep", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyperadam: error:") and message in err
    assert not out.exists()


def _result(optimizer, losses, *, adam=None, runs=10, engine="runtime"):
    """A sweep's JSON as ``sweep`` writes it: ``losses`` is task → {multiple: loss}."""
    rows = hundred_step_rows()
    return {
        "config": {"optimizer": optimizer, "runs": runs, "seed": 0},
        "engine": engine,
        "rows": {
            task: {
                "adam_final_loss": (adam or {}).get(task, 1.0),
                "final_loss_by_multiple": {repr(float(m)): loss for m, loss in by.items()},
                "paper_ratio": rows[task],
            }
            for task, by in losses.items()
        },
    }


def test_a_merged_table_puts_every_multiple_of_one_optimizer_side_by_side():
    first = _result("a/theta.npz", {"sin-lstm": {1: 0.9, 2: 0.5}, "mnist-nn-tanh-100": {1: 0.95}})
    second = _result("a/theta.npz", {"sin-lstm": {10: math.nan}, "mnist-nn-tanh-100": {10: 2.0}})
    lines = merge_tables([("first", first), ("second", second)]).splitlines()
    assert lines[0] == "| row | paper's ratio | ×1 | ×2 | ×10 | best |"
    # Rows in the paper's order; starred where at or below the paper's ratio (0.42/0.65 for the
    # sine LSTM, 0.36/0.34 for tanh); a diverged run is named, not a number.
    assert lines[2] == "| Table 1 tanh | 1.059 | **0.950*** | — | 2.000 | ×1 |"
    assert lines[3] == "| Table 2 Baseline | 0.646 | 0.900 | **0.500*** | non-finite | ×2 |"
    assert lines[4] == "| **rows met, of 2** | | 1 | 1 of 1 | 0 | **2** |"


def test_a_merged_table_of_several_optimizers_names_each_column_by_its_arm():
    mine = _result("runs/ablation/ARM/theta.npz", {"sin-lstm": {1: 0.6}}, adam={"sin-lstm": 2.0})
    paper = _result("hyperadam", {"sin-lstm": {1: 1.0}}, adam={"sin-lstm": 2.0})
    table = merge_tables([("mine", mine), ("paper", paper)]).splitlines()
    assert table[0] == "| row | paper's ratio | ARM ×1 | hyperadam ×1 |"
    assert table[2] == "| Table 2 Baseline | 0.646 | **0.300*** | **0.500*** |"


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (_result("x", {"sin-lstm": {1: 1.0}}, runs=3), "runs 3, first 10: not the same runs"),
        (_result("x", {"sin-lstm": {1: 1.0}}, engine="reference"), "one table keeps to one"),
        (_result("x", {"sin-lstm": {1: 1.0}}, adam={"sin-lstm": 1.5}), "Adam's loss on sin-lstm"),
        (_result("x", {"sin-lstm": {1: 0.7}}), "x ×1 on sin-lstm is given twice"),
    ],
)
def test_sweeps_that_are_not_the_same_runs_are_refused(other, message):
    first = _result("x", {"sin-lstm": {1: 0.9}})
    with pytest.raises(ValueError, match=message):
        merge_tables([("first", first), ("other", other)])


def test_the_table_command_renders_the_committed_sweeps_as_the_docs_show_them(tmp_path, capsys):
    sweeps = REPO / "docs" / "sweeps"
    files = [str(sweeps / f"paper-{part}.json") for part in "abcd"]
    assert cli_main(["lr-sweep", "--table", *files]) == 0
    out = capsys.readouterr().out
    # docs/generalisation.md, session 19: the paper's θ meets 7 of 16 at its own step, 8 at its
    # best multiple per row, and none of the deep-sigmoid rows at ×0.1 and ×0.25.
    assert "| **rows met, of 16** | | 0 of 8 | 0 of 8 | 3 | 7 | 6 | 4 | 2 | **8** |" in out
    paper_a = json.loads((sweeps / "paper-a.json").read_text())["rows"]["sin-lstm"]
    ratio = paper_a["final_loss_by_multiple"]["2.0"] / paper_a["adam_final_loss"]
    assert f"**{ratio:.3f}***" in out.split("Table 2 Baseline")[1].splitlines()[0]
    # Bad input: a run flag beside --table, a missing file, a file that is not a sweep's.
    (tmp_path / "other.json").write_text(json.dumps({"rows": {}}))
    for argv, message in [
        (["--table", files[0], "--runs", "3"], "--table runs nothing, so it takes no --runs"),
        (["--table", str(tmp_path / "none.json")], "cannot read"),
        (["--table", str(tmp_path / "other.json")], "is not a sweep's JSON"),
    ]:
        assert cli_main(["lr-sweep", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hyperadam: error:") and message in err
