"""The evaluation protocol and ``hyperadam evaluate`` (spec §4)."""

import json
import math
import shutil
from pathlib import Path

import pytest

from meta_train.cli import main
from meta_train.evaluate import evaluate, run_once, run_seed
from meta_train.optimizers import make_baseline
from meta_train.tasks.quadratic import QuadraticTask
from runtime import manifest as mf
from runtime.sources import BUILTIN_DIR

# An independent plain-PyTorch Adam loop of the same protocol (MNIST 60k train images, batch 128,
# init N(0, 0.1²), lr of spec §5), 20 runs, measured once before this code existed (issue 2).
INDEPENDENT_ADAM = {"sigmoid": 0.297, "relu": 0.273, "elu": 0.248, "tanh": 0.298}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("activation", sorted(INDEPENDENT_ADAM))
def test_adam_matches_an_independent_loop_of_the_same_protocol(capsys, activation):
    code, out, _ = run_cli(
        capsys,
        "evaluate",
        "--task",
        f"mnist-nn-{activation}-100",
        "--optimizer",
        "adam",
        "--runs",
        "20",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["task"] == f"mnist-nn-{activation}-100" and result["optimizer"] == "adam"
    assert result["runs"] == 20 and len(result["final_losses"]) == 20
    assert abs(result["final_loss_mean"] - INDEPENDENT_ADAM[activation]) <= 0.03
    assert result["final_loss_std"] > 0


def test_every_optimizer_sees_the_same_init_and_batches():
    task = QuadraticTask(dim=8, seed=2)
    curves = [
        run_once(task, make_baseline(name, 0.05), steps=5, seed=run_seed(3, 0)).curve
        for name in ("adam", "sgd", "rmsprop")
    ]
    assert curves[0][0] == curves[1][0] == curves[2][0]  # same w_0 on the same batch 0
    assert curves[0][1] != curves[1][1]  # ... then the optimizers differ


def test_final_loss_is_the_final_parameters_averaged_over_the_run_batches():
    task = QuadraticTask(dim=4, rows=8, batch_size=8, seed=0)  # every batch = all rows
    result = run_once(task, make_baseline("sgd", 0.1), steps=3, seed=0)
    assert len(result.curve) == 3 and not result.diverged
    # With full batches the final loss is the full loss of w_T, below the starting loss.
    assert result.final_loss < result.curve[0]


def test_the_held_out_final_loss_is_the_last_checkpoint_and_leaves_the_run_unchanged():
    task = QuadraticTask(dim=4, rows=64, batch_size=8, seed=0)
    own = run_once(task, make_baseline("adam", 0.05), steps=40, seed=1, checkpoints=4)
    held = run_once(
        task, make_baseline("adam", 0.05), steps=40, seed=1, checkpoints=4, final_loss="held_out"
    )
    assert held.curve == own.curve and held.checkpoint_losses == own.checkpoint_losses
    assert held.final_loss == held.checkpoint_losses[-1] != own.final_loss
    with pytest.raises(ValueError, match="final_loss must be one of"):
        run_once(task, make_baseline("adam", 0.05), steps=1, seed=1, final_loss="last_batch")


def test_a_diverging_run_is_reported_not_averaged_away():
    task = QuadraticTask(dim=4, seed=0)
    result = evaluate(task, make_baseline("sgd", 1e6), task_name="q", steps=50, runs=2)
    assert result.diverged_runs == 2 and all(math.isinf(x) for x in result.final_losses)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--task", "mnist-nn-nope-100", "--optimizer", "adam"],
            "unknown task 'mnist-nn-nope-100'",
        ),
        (["--task", "sin-lstm", "--optimizer", "adamw"], "unknown optimizer 'adamw'"),
        (
            ["--task", "sin-lstm", "--optimizer", "adam", "--runs", "0"],
            "--runs must be >= 1, got 0",
        ),
        (["--task", "sin-lstm", "--optimizer", "adam", "--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["--task", "cifar10-cnn2-2000", "--optimizer", "adam"], "CIFAR-10"),
    ],
)
def test_bad_evaluate_arguments_give_one_line_errors(capsys, args, message):
    code, out, err = run_cli(capsys, "evaluate", *args)
    assert code == 2 and out == ""
    assert err.startswith("hyperadam: error: ") and message in err
    assert "Traceback" not in err


def test_sine_task_and_text_output(capsys):
    code, out, _ = run_cli(
        capsys,
        "evaluate",
        "--task",
        "sin-lstm",
        "--optimizer",
        "adam",
        "--runs",
        "2",
        "--steps",
        "20",
    )
    assert code == 0 and "sin-lstm  adam (lr 0.0220971)  2 runs × 20 steps  final loss" in out


def exported_copy(tmp_path):
    folder = tmp_path / "exported-opt"
    shutil.copytree(BUILTIN_DIR / "hyperadam", folder)
    return folder


@pytest.mark.parametrize("tamper", ["swapped-theta", "corrupted-graph"])
def test_an_exported_folder_is_verified_before_it_is_evaluated(capsys, tmp_path, tamper):
    folder = exported_copy(tmp_path)
    if tamper == "swapped-theta":  # a valid θ file of the same method, but not the exported one
        checkpoints = Path(__file__).parents[2] / "checkpoints"
        other = checkpoints / "hyperadam-seed0-step6200-best-theta.npz"
        (folder / "theta.npz").write_bytes(other.read_bytes())
        name = "theta.npz"
    else:
        graph = folder / "fused.onnx"
        graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
        name = "fused.onnx"
    code, out, err = run_cli(capsys, "evaluate", "--task", "sin-lstm", "--optimizer", str(folder),
                             "--runs", "1", "--steps", "2")
    assert code == 2 and out == ""
    listed = json.loads((folder / mf.MANIFEST_FILE).read_text())["files"][name]
    assert err == (
        f"hyperadam: error: {name} does not match its sha256 in manifest.json (expected {listed}, "
        f"file has {mf.sha256_file(folder / name)}): the folder was modified after export\n"
    )


def test_an_exported_folder_is_labelled_by_its_method_and_path(capsys, tmp_path):
    folder = exported_copy(tmp_path)
    code, out, _ = run_cli(capsys, "evaluate", "--task", "sin-lstm", "--optimizer", str(folder),
                           "--runs", "1", "--steps", "2", "--json")
    assert code == 0
    assert json.loads(out)["optimizer"] == f"hyperadam ({folder})"
    code, out, _ = run_cli(capsys, "evaluate", "--task", "sin-lstm", "--optimizer", "hyperadam",
                           "--runs", "1", "--steps", "2", "--json")
    assert json.loads(out)["optimizer"] == "hyperadam"  # the built-in
