"""``hyperadam reproduce --engine runtime``: candidate θs on the paper's rows through their
exported ONNX step (``meta_train.runtime_rule.ExportedRule``), the paper's four on the reference.

The θ is a trained tensor-wise θ with the adaptive step scale (per-array statistics): the most
the runtime has to get right, and the kind whose reference step makes the long rows take hours.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from meta_train import cli
from meta_train.benchmark import RUNTIME_SUFFIX, describe_optimizer
from meta_train.commands._runtime_engine import export_theta_files
from meta_train.errors import UsageError
from meta_train.evaluate import evaluate
from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam
from meta_train.reproduce import (
    QUICK_TASKS,
    ReproduceConfig,
    candidate_info,
    evaluate_cell,
    replaced_candidates,
    resolve_optimizers,
)
from meta_train.runtime_rule import ExportedRule
from meta_train.seeding import generator
from meta_train.tasks.suite import TEST_TASKS, build_test_task
from runtime.theta import save_theta

ROOT = Path(__file__).resolve().parents[2]
THETA = ROOT / "checkpoints" / "ablation" / "tensor-adaptive-small-log-pes" / "theta.npz"
PAPER = ("adam", "hyperadam", "rnnprop", "dm")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the CLI's default ``--threads 1`` (two on a busy machine cost ×10)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The command layer's exports of a sitting naming the θ by its file and by its folder."""
    into = tmp_path_factory.mktemp("exports")
    sources = ("adam", "hyperadam", str(THETA), str(THETA.parent))
    return into, export_theta_files(sources, into, flag="--optimizers")


def run_reproduce(*args: str) -> int:
    return cli.main(["reproduce", "--tracking-uri", "none", *args])


# -- labels, exports, merges (no cell runs) -----------------------------------------------------


def test_a_theta_is_exported_once_and_the_built_ins_not_at_all(exports):
    into, folders = exports
    assert set(folders) == {str(THETA), str(THETA.parent)}  # not adam, not the built-in
    assert folders[str(THETA)] == folders[str(THETA.parent)]  # one θ, one export (one parity)
    assert [p.name for p in into.iterdir()] == [Path(folders[str(THETA)]).name]
    garbage = into.parent / "garbage.npz"
    garbage.write_bytes(b"not a theta file")
    with pytest.raises(UsageError, match=f"^--optimizers {garbage}: cannot export it: "):
        export_theta_files((str(garbage),), into / "more", flag="--optimizers")


def test_runtime_candidates_end_in_ort_and_the_paper_optimizers_are_unchanged(exports):
    _, folders = exports
    exported = folders[str(THETA)]
    sources = (*PAPER, str(THETA), str(THETA.parent), exported)
    reference = resolve_optimizers(sources)
    runtime = resolve_optimizers(sources, engine="runtime", folders=folders)
    assert runtime[:4] == reference[:4]  # the paper's four: same labels, identities, no folder
    assert all(spec.folder is None for spec in runtime[:4])
    # The θ by file and by folder is one column; the exported folder (named by its folder) too.
    theta, export = runtime[4:]
    assert theta.label == describe_optimizer(str(THETA)).label + RUNTIME_SUFFIX
    assert theta.identity == reference[4].identity + RUNTIME_SUFFIX
    assert theta.folder == exported and theta.source == str(THETA)
    assert export.label.endswith(RUNTIME_SUFFIX) and export.folder == exported
    info = candidate_info(theta)
    assert info["engine"] == "runtime" and info["identity"] == theta.identity
    assert "engine" not in candidate_info(reference[4])  # a reference record stays as it was
    with pytest.raises(UsageError, match=f"--optimizers {THETA}: engine 'runtime' needs it"):
        resolve_optimizers(("adam", str(THETA)), engine="runtime")
    with pytest.raises(UsageError, match="--engine must be one of"):
        ReproduceConfig(engine="onnx")


def test_a_merge_replaces_a_changed_theta_but_keeps_the_other_engines_column(tmp_path, exports):
    _, folders = exports
    theta = tmp_path / "cand" / "theta.npz"
    theta.parent.mkdir()
    shutil.copy(THETA, theta)
    reference = resolve_optimizers((str(theta),))[0]
    previous = {"candidates": {reference.label: candidate_info(reference)}}
    runtime = resolve_optimizers(
        (str(theta),), engine="runtime", folders={str(theta): folders[str(THETA)]}
    )
    assert replaced_candidates(previous, runtime) == {}  # the same θ through the runtime
    save_theta(theta, "hyperadam-tensor", TensorwiseHyperAdam(2).init_theta(generator(0)))
    retrained = resolve_optimizers((str(theta),), engine="runtime", folders={str(theta): "x"})
    assert replaced_candidates(previous, retrained) == {reference.label: retrained[0].label}


# -- cells --------------------------------------------------------------------------------------


def test_a_runtime_cell_steps_the_export_bound_to_the_tasks_tensor_layout(exports):
    _, folders = exports
    folder, key = folders[str(THETA)], "sin-lstm"
    cell = evaluate_cell(key, str(THETA), 2, 0, None, folder)
    reference = evaluate_cell(key, str(THETA), 2, 0, None)
    assert cell["lr"] == reference["lr"] == TensorwiseHyperAdam.default_lr
    assert cell["optimizer"] == reference["optimizer"] + RUNTIME_SUFFIX  # the θ's path
    task = build_test_task(key)
    assert len(task.tensor_sizes) == 4
    kwargs = dict(task_name=key, steps=TEST_TASKS[key].horizon, runs=2, seed=0, lr=cell["lr"])
    bound = evaluate(task, ExportedRule(folder, lr=cell["lr"]).for_tensors(task.tensor_sizes),
                     **kwargs)  # fmt: skip
    whole = evaluate(task, ExportedRule(folder, lr=cell["lr"]).for_tensors([task.num_params]),
                     **kwargs)  # fmt: skip
    assert cell["final_losses"] == bound.final_losses  # bound per tensor by run_once
    assert cell["final_losses"] != whole.final_losses
    # The same optimizer as the reference's, to round-off per step (not bitwise over a run).
    for ours, theirs in zip(cell["final_losses"], reference["final_losses"], strict=True):
        assert math.isclose(ours, theirs, rel_tol=1e-4)


def test_a_merge_keeps_the_reference_and_the_runtime_columns_of_one_theta_apart(tmp_path, capsys):
    docs = tmp_path / "docs"
    args = ["--merge", "--out", str(docs), "--tasks", "sin-lstm", "--runs", "2",
            "--optimizers", "adam", str(THETA)]  # fmt: skip
    assert run_reproduce(*args) == 0
    first = json.loads((docs / "results.json").read_text())
    assert run_reproduce(*args, "--engine", "runtime") == 0
    merged = json.loads((docs / "results.json").read_text())
    label = describe_optimizer(str(THETA)).label
    cells = merged["results"]["sin-lstm"]
    assert set(cells) == {"adam", label, label + RUNTIME_SUFFIX}
    assert cells[label] == first["results"]["sin-lstm"][label]  # the reference cell, as it was
    assert cells["adam"]["final_losses"] == first["results"]["sin-lstm"]["adam"]["final_losses"]
    assert cells[label + RUNTIME_SUFFIX]["identity"] == cells[label]["identity"] + RUNTIME_SUFFIX
    assert set(merged["candidates"]) == {label, label + RUNTIME_SUFFIX}
    assert merged["candidates"][label + RUNTIME_SUFFIX]["engine"] == "runtime"
    assert [s["config"].get("engine") for s in merged["sittings"]] == ["reference", "runtime"]
    markdown = (docs / "results.md").read_text()
    assert f"| {label} (ours) | {label}{RUNTIME_SUFFIX} (ours) |" in markdown
    assert f"- **{label}{RUNTIME_SUFFIX}**: candidate θ `{THETA}`" in markdown
    assert "through its exported ONNX step (onnxruntime)" in markdown
    assert f"| {label}{RUNTIME_SUFFIX} | " in markdown  # the candidate summary
    # A third sitting through the runtime reruns nothing: each engine keeps its own cells.
    capsys.readouterr()
    assert run_reproduce(*args, "--engine", "runtime") == 0
    printed = capsys.readouterr().out
    assert f"sin-lstm × {label}{RUNTIME_SUFFIX}: kept (same θ, same 2 runs)" in printed
    assert json.loads((docs / "results.json").read_text())["results"] == merged["results"]


@pytest.mark.slow  # exports the θ and runs the quick grid in two worker processes (≈ 30 s)
def test_quick_end_to_end_through_the_runtime_in_worker_processes(tmp_path, exports):
    _, folders = exports
    docs, uri = tmp_path / "docs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["reproduce", "--quick", "--engine", "runtime", "--jobs", "2",
                     "--optimizers", "adam", "hyperadam", str(THETA), "--out", str(docs),
                     "--tracking-uri", uri])  # fmt: skip
    assert code == 0
    report = json.loads((docs / "results.json").read_text())
    label = describe_optimizer(str(THETA)).label + RUNTIME_SUFFIX
    assert report["config"]["engine"] == "runtime"
    assert set(report["candidates"]) == {label}
    for task in QUICK_TASKS:
        cells = report["results"][task]
        assert set(cells) == {"adam", "hyperadam", label}
        assert cells["hyperadam"]["optimizer"] == "hyperadam"  # the reference, as ever
        assert cells[label]["runs"] == 2 and all(map(math.isfinite, cells[label]["final_losses"]))
        assert cells[label]["unstable"] == [False, False]
    # The worker processes stepped what this process steps (a folder crossed, not a session).
    serial = evaluate_cell("sin-lstm", str(THETA), 2, 0, None, folders[str(THETA)])
    assert report["results"]["sin-lstm"][label]["final_losses"] == serial["final_losses"]
    markdown = (docs / "results.md").read_text()
    assert "| hyperadam | " in markdown and f"| {label} | " in markdown  # the summary rows
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("hyperadam-reproduce").experiment_id])
    assert json.loads(run[0].data.params["engine"]) == "runtime"


# -- scripts/reproduce_candidate ----------------------------------------------------------------


def test_reproduce_candidate_runs_the_candidates_through_the_runtime_unless_told(tmp_path):
    # The script in a copy of the tree whose hyperadam only records its arguments.
    (tmp_path / "scripts").mkdir()
    script = shutil.copy(ROOT / "scripts" / "reproduce_candidate", tmp_path / "scripts")
    calls = tmp_path / "calls"
    stub = tmp_path / ".venv" / "bin" / "hyperadam"
    stub.parent.mkdir(parents=True)
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    stub.chmod(0o700)  # under pytest's private tmp_path; run by this user only

    def engines(**env: str) -> list[str]:
        calls.unlink(missing_ok=True)
        subprocess.run([script, "THETA"], check=True, env={"PATH": os.environ["PATH"], **env})
        lines = calls.read_text().splitlines()
        assert len(lines) == 3 and all("--optimizers THETA" in line for line in lines)
        return [line.split("--engine ")[-1].split()[0] for line in lines]  # argparse: last wins

    assert engines() == ["runtime"] * 3
    assert engines(REPRODUCE_FLAGS="--engine reference --jobs 2") == ["reference"] * 3
