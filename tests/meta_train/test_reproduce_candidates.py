"""``hyperadam reproduce --optimizers ... PATH``: candidate θs judged on the paper's rows.

A candidate is any θ file or folder ``meta_train.theta_source`` loads, labelled and fingerprinted
as the held-out benchmark does, run at its own default lr and bound to each task's tensor
layout; the report adds it as a column and summarises it against the paper's targets.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from meta_train import cli
from meta_train.benchmark import describe_optimizer, unstable_by_checkpoints
from meta_train.evaluate import evaluate
from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam
from meta_train.paper import GRID
from meta_train.reproduce import (
    QUICK_TASKS,
    ReproduceConfig,
    evaluate_cell,
    existing_analysis,
    format_ours,
    ratio_rows,
    render_markdown,
    resolve_optimizers,
)
from meta_train.resolve import resolve_optimizer
from meta_train.seeding import generator
from meta_train.tasks.suite import TEST_TASKS, build_test_task
from runtime.theta import save_theta

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ABLATION_THETA = ROOT / "checkpoints" / "ablation" / "tensor-adam-start" / "theta.npz"


def tiny_tensor_theta(path: Path, seed: int = 0) -> Path:
    """A per-tensor HyperAdam θ with J = 2 (cheap to run), drawn from its initialisation."""
    theta = TensorwiseHyperAdam(2, bounded=True).init_theta(generator(seed))
    save_theta(path, "hyperadam-tensor", theta)
    return path


def table_rows(markdown: str, section: str) -> list[list[str]]:
    block = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def committed_report() -> dict:
    return json.loads((DOCS / "results.json").read_text())


def render_committed(report: dict) -> str:
    return render_markdown(
        report, ReproduceConfig().report_rows(), existing_analysis(DOCS / "results.md")
    )


# -- the committed document ---------------------------------------------------------------------


def test_the_committed_report_renders_byte_identical_without_a_candidate():
    assert render_committed(committed_report()) == (DOCS / "results.md").read_text()


def test_a_candidate_is_one_more_column_and_a_summary_the_built_ins_untouched():
    report = committed_report()
    before = render_committed(report)
    # A candidate whose cells are the built-in HyperAdam's, so every verdict can be checked
    # against the document's own line for the built-in ("8 of 19").
    label = "copy@0123abcd"
    candidate = copy.deepcopy(report)
    for cells in candidate["results"].values():
        if "hyperadam" in cells:
            cell = cells["hyperadam"]
            cells[label] = {**cell, "identity": "0123abcd" * 2}
            if "final_losses" in cell:  # instability as a candidate's cells record it
                cells[label]["unstable"] = [False] * len(cell["final_losses"])
                cells[label]["unstable_rule"] = "checkpoints"
    candidate["results"]["mnist-cnn2-10000"][label]["unstable"] = [True]
    # A cell judged by the first rule (the smoothed minibatch minimum) is shown, not counted.
    del candidate["results"]["mnist-cnn1-10000"][label]["unstable_rule"]
    candidate["candidates"] = {
        label: {"source": "x/theta.npz", "identity": "0123abcd" * 2, "method": "hyperadam",
                "lr": 0.005}
    }  # fmt: skip
    after = render_committed(candidate)
    assert after != before
    for section in ("Table 1", "Table 2", "Table 3", "Fig. 5(d)", "Longer horizons"):
        old, new = table_rows(before, section), table_rows(after, section)
        assert new[0] == old[0] + [f"{label} (ours)"]  # no "(paper)" column: the paper has none
        for old_row, new_row in zip(old[1:], new[1:], strict=True):
            assert new_row[:-1] == old_row
            assert new_row[-1] == new_row[-2]  # the copy's cell reads as HyperAdam's
    ratio_old = table_rows(before, "HyperAdam / Adam ratio (lower is better)")
    ratio_new = table_rows(after, "HyperAdam / Adam ratio (lower is better)")
    assert ratio_old[0] == ["row", "paper", "ours", "runs compared", "ours ≤ paper"]
    assert ratio_new[0] == ["row", "paper"] + [
        cell for name in ("hyperadam", label) for cell in (name, "runs compared", f"{name} ≤ paper")
    ]
    for old_row, new_row in zip(ratio_old[1:], ratio_new[1:], strict=True):
        assert new_row == old_row + old_row[2:]
    summary = table_rows(after, "Candidate θs on the paper's rows")
    assert summary[0] == [
        "optimizer", "rows at or below the paper's ratio", "unstable runs",
        "Table 3 test accuracy vs Adam",
    ]  # fmt: skip
    builtin, copied = summary[1], summary[2]
    assert builtin[0] == "hyperadam" and copied[0] == label
    assert "At or below the paper's ratio on 8 of 19 rows." in after
    assert builtin[1] == copied[1] == "8 of 19"
    judged = [
        c[label] for c in candidate["results"].values() if "unstable_rule" in c.get(label, {})
    ]
    runs = sum(len(cell["unstable"]) for cell in judged)
    assert copied[2] == (
        f"1 of {runs} ({len(judged)} tasks; mnist-cnn2-10000); "
        "1 tasks judged by the first rule (not counted)"
    )
    recorded = len(judged) + 1
    assert builtin[2] == f"—; {recorded} tasks not recorded"  # cells from before the record
    cnn1, cnn2 = candidate["results"]["mnist-cnn1-10000"], candidate["results"]["mnist-cnn2-10000"]
    assert copied[3] == "; ".join(
        f"{name} {100 * ours[metric]:.2f} % vs {100 * adam[metric]:.2f} % (below)"
        for name, ours, adam, metric in [
            ("CNN-1 top-1", cnn1[label], cnn1["adam"], "test_top1_mean"),
            ("CNN-1 top-2", cnn1[label], cnn1["adam"], "test_top2_mean"),
            ("CNN-2 top-1", cnn2[label], cnn2["adam"], "test_top1_mean"),
            ("CNN-2 top-2", cnn2[label], cnn2["adam"], "test_top2_mean"),
        ]
    )
    # Ahead of Adam on a top-1 once its mean is raised above Adam's.
    candidate["results"]["mnist-cnn1-10000"][label]["test_top1_mean"] = 0.99
    assert "CNN-1 top-1 99.00 % vs 98.73 % (at or above)" in render_committed(candidate)


# -- resolving candidates -----------------------------------------------------------------------


def test_candidates_are_labelled_as_the_heldout_benchmark_labels_them(tmp_path):
    specs = resolve_optimizers(
        ("adam", "hyperadam", str(ABLATION_THETA), str(ABLATION_THETA.parent))
    )
    expected = describe_optimizer(str(ABLATION_THETA))
    assert [s.label for s in specs] == ["adam", "hyperadam", expected.label]  # file = folder
    assert expected.label == f"tensor-adam-start@{expected.identity[:8]}"
    assert specs[2].identity == expected.identity
    # A θ file outside an arm's folder is named by its stem; another θ gets another digest.
    one, two = tiny_tensor_theta(tmp_path / "a.npz", 0), tiny_tensor_theta(tmp_path / "b.npz", 1)
    a, b = resolve_optimizers((str(one), str(two)))
    assert a.label.startswith("a@") and b.label.startswith("b@") and a.identity != b.identity


def test_a_per_tensor_candidate_runs_bound_to_the_tasks_tensor_layout(tmp_path):
    source = str(tiny_tensor_theta(tmp_path / "t.npz"))
    key = "mnist-nn-sigmoid-100"
    cell = evaluate_cell(key, source, 1, 0, None)
    rule, lr = resolve_optimizer(source, TEST_TASKS[key])
    assert lr == TensorwiseHyperAdam.default_lr == cell["lr"]  # the θ's own default lr
    task = build_test_task(key)
    assert len(task.tensor_sizes) == 4
    kwargs = dict(task_name=key, steps=TEST_TASKS[key].horizon, runs=1, seed=0)
    bound = evaluate(task, rule.for_tensors(task.tensor_sizes), **kwargs)
    one_tensor = rule.for_tensors((sum(task.tensor_sizes),))  # normalised over the whole vector
    whole = evaluate(task, one_tensor, **kwargs)
    assert evaluate(task, rule, **kwargs).final_losses == bound.final_losses  # bound by default
    assert cell["final_losses"] == bound.final_losses
    assert cell["final_losses"] != whole.final_losses
    assert cell["optimizer"] == f"hyperadam-tensor ({source})"


def test_instability_is_the_heldout_benchmarks_definition():
    # the last iterate's held-out loss against 1.5 × the lowest of the measured iterates'
    assert not unstable_by_checkpoints((3.0, 1.0, 2.0, 1.5), diverged=False)
    assert unstable_by_checkpoints((3.0, 1.0, 2.0, 1.51), diverged=False)
    assert unstable_by_checkpoints((3.0, 1.0), diverged=True)  # a diverged run has no last one
    assert unstable_by_checkpoints((3.0, float("inf")), diverged=False)
    with pytest.raises(ValueError, match="no measured iterates"):
        unstable_by_checkpoints((), diverged=False)
    cell = evaluate_cell("mnist-nn-sigmoid-100", "adam", 2, 0, None)
    assert cell["unstable"] == [False, False] and cell["unstable_rule"] == "checkpoints"


def test_measuring_the_iterates_leaves_every_run_bitwise_as_it_was():
    # The checkpoint losses come from their own batches: curve and final loss are unchanged.
    key = "mnist-nn-sigmoid-100"
    task = build_test_task(key)
    rule, lr = resolve_optimizer("adam", TEST_TASKS[key])
    kwargs = dict(task_name=key, steps=TEST_TASKS[key].horizon, runs=2, seed=0, lr=lr)
    seen: list = []
    plain = evaluate(task, rule, **kwargs)
    measured = evaluate(task, rule, checkpoints=20, on_run=seen.append, **kwargs)
    assert measured.final_losses == plain.final_losses
    assert measured.curve_mean == plain.curve_mean
    assert all(len(run.checkpoint_losses) == 21 for run in seen)  # 20 iterates and the last
    assert seen[0].checkpoint_losses[0] > seen[0].checkpoint_losses[-1]  # it learned


# -- bad θ paths --------------------------------------------------------------------------------


def bad_sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "empty").mkdir(parents=True)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a theta file")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(ABLATION_THETA.read_bytes()[:3000])
    misfit = tmp_path / "misfit.npz"
    save_theta(misfit, "hyperadam-tensor", {"pre_bias": np.zeros(3, np.float32)})
    return {
        "missing": (tmp_path / "missing.npz", "not one of adam, dm, rnnprop, hyperadam and no θ "
                    "file or folder there"),
        "garbage": (garbage, "is not a θ artifact (.npz)"),
        "truncated": (truncated, "not a θ artifact (.npz): File is not a zip file"),
        "misfit": (misfit, "theta for hyperadam-tensor {'num_candidates': 3} must have tensors"),
        "empty-folder": (tmp_path / "empty", "no θ artifact at"),
    }  # fmt: skip


def test_a_missing_or_corrupt_theta_is_a_one_line_error_that_changes_nothing(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    previous = {"config": {}, "created": "x", "hardware": "y", "results": {}, "optimizers": {}}
    (docs / "results.json").write_text(json.dumps(previous))
    before = (docs / "results.json").read_bytes()
    sources = bad_sources(tmp_path / "thetas")
    for path, message in sources.values():
        code = cli.main(
            ["reproduce", "--quick", "--merge", "--optimizers", "adam", str(path),
             "--out", str(docs), "--tracking-uri", "none"]
        )  # fmt: skip
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert err[0].startswith(f"hyperadam: error: --optimizers {path}: ")
        assert message in err[0]
    assert (docs / "results.json").read_bytes() == before
    assert sorted(p.name for p in docs.iterdir()) == ["results.json"]
    code = cli.main(["reproduce", "--optimizers", "adma", "--tracking-uri", "none"])
    assert code == 2
    assert capsys.readouterr().err.startswith(
        "hyperadam: error: --optimizers adma: not one of adam, dm, rnnprop, hyperadam"
    )


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_with_candidate(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-candidate")
    (out / "cand").mkdir()
    theta = tiny_tensor_theta(out / "cand" / "theta.npz")  # an arm's folder: named "cand"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    threads = torch.get_num_threads()
    try:
        code = cli.main(
            ["reproduce", "--quick", "--optimizers", "adam", str(theta), "--out",
             str(out / "docs"), "--tracking-uri", uri]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out, theta, uri


@pytest.mark.slow  # the quick grid for Adam and a J = 2 per-tensor θ (≈ 1–2 min)
def test_quick_end_to_end_with_a_theta_file(quick_with_candidate):
    out, theta, uri = quick_with_candidate
    docs = out / "docs"
    report = json.loads((docs / "results.json").read_text())
    label = describe_optimizer(str(theta)).label
    assert label == f"cand@{describe_optimizer(str(theta)).identity[:8]}"
    assert report["candidates"][label] == {
        "source": str(theta),
        "identity": describe_optimizer(str(theta)).identity,
        "method": "hyperadam-tensor",
        "lr": TensorwiseHyperAdam.default_lr,
    }
    markdown = (docs / "results.md").read_text()
    assert f"- **{label}**: candidate θ `{theta}` (hyperadam-tensor, θ digest " in markdown
    for task in QUICK_TASKS:
        cell = report["results"][task][label]
        assert cell["runs"] == 2 and cell["lr"] == TensorwiseHyperAdam.default_lr
        assert len(cell["unstable"]) == 2
        assert cell["identity"] == report["candidates"][label]["identity"]
        assert (docs / "figures" / f"{task}.png").stat().st_size > 1000
    rows = [row for row in GRID if row.task in QUICK_TASKS]
    for section in dict.fromkeys(row.section for row in rows):
        table = table_rows(markdown, section)
        assert table[0] == ["row", "metric", "adam (paper)", "adam (ours)", f"{label} (ours)"]
        for row, cells in zip([r for r in rows if r.section == section], table[1:], strict=True):
            assert cells[-1] == format_ours(report["results"][row.task][label], row.metric)
    ratios = {r["row"]: r for r in ratio_rows(rows, report["results"], label)}
    ratio_table = table_rows(markdown, "HyperAdam / Adam ratio (lower is better)")
    assert ratio_table[0][-3:] == [label, "runs compared", f"{label} ≤ paper"]
    for line in ratio_table[1:]:
        r = ratios[line[0]]
        assert line[2:5] == ["not run", "—", "—"]  # the built-in was not in this sitting
        assert line[5:] == [f"{r['ours']:.2f}", "2", "yes" if r["ours"] <= r["paper"] else "no"]
    summary = dict((r[0], r[1:]) for r in table_rows(markdown, "Candidate θs on the paper's rows"))
    met = sum(r["ours"] <= r["paper"] for r in ratios.values())
    flags = {t: report["results"][t][label]["unstable"] for t in QUICK_TASKS}
    where = "".join(f"; {t}" for t in report["results"] if any(flags[t]))
    unstable = f"{sum(map(sum, flags.values()))} of 4 (2 tasks{where})"
    assert summary[label] == [f"{met} of 3", unstable, "—"]
    run = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("hyperadam-reproduce").experiment_id]
    )[0]
    assert json.loads(run.data.params["optimizers"]) == ["adam", str(theta)]


@pytest.mark.slow  # reuses the quick report; the changed θ reruns one task (≈ 20 s)
def test_merge_keeps_an_unchanged_theta_and_reruns_a_changed_one(
    quick_with_candidate, tmp_path, capsys
):
    out, theta, _ = quick_with_candidate
    docs = tmp_path / "docs"
    shutil.copytree(out / "docs", docs)
    first = json.loads((docs / "results.json").read_text())
    old_label = describe_optimizer(str(theta)).label
    args = ["reproduce", "--quick", "--merge", "--out", str(docs), "--tracking-uri", "none"]
    capsys.readouterr()
    assert cli.main([*args, "--optimizers", str(theta.parent)]) == 0  # the folder: the same θ
    printed = capsys.readouterr().out
    for task in QUICK_TASKS:
        assert f"[reproduce] {task} × {old_label}: kept (same θ, same 2 runs)" in printed
    assert " runs, " not in printed  # no cell ran
    again = json.loads((docs / "results.json").read_text())
    assert again["results"] == first["results"]
    assert len(again["sittings"]) == 2
    # Retrained at the same path: another digest, so another column; the stale one is dropped.
    kept = theta.read_bytes()
    try:
        tiny_tensor_theta(theta, seed=1)
        new_label = describe_optimizer(str(theta)).label
        code = cli.main([*args, "--optimizers", str(theta), "--tasks", "mnist-nn-sigmoid-100"])
    finally:
        theta.write_bytes(kept)  # the module's fixture stays as it was
    assert code == 0 and new_label != old_label
    printed = capsys.readouterr().out
    assert f"[reproduce] {old_label} replaced by {new_label}" in printed
    assert f"[reproduce] mnist-nn-sigmoid-100 × {new_label} (2 runs, 100 steps)" in printed
    last = json.loads((docs / "results.json").read_text())
    assert set(last["candidates"]) == {new_label}
    assert all(old_label not in cells for cells in last["results"].values())
    sigmoid = "mnist-nn-sigmoid-100"
    assert last["results"][sigmoid]["adam"] == first["results"][sigmoid]["adam"]
    markdown = (docs / "results.md").read_text()
    assert old_label not in markdown and f"{new_label} (ours)" in markdown


def test_a_cell_or_candidate_of_the_same_numbers_under_another_method_is_not_kept(tmp_path):
    # The adaptive and trend variants' untrained starts are the same numbers under two steps.
    from meta_train.reproduce import replaced_candidates, unchanged_cell

    theta = tmp_path / "start" / "theta.npz"
    theta.parent.mkdir()
    shutil.copy("checkpoints/ablation/tensor-adaptive-start/theta.npz", theta)
    adaptive = describe_optimizer(str(theta))
    shutil.copy("checkpoints/ablation/tensor-trend-start/theta.npz", theta)
    trend = describe_optimizer(str(theta))
    assert (adaptive.label, adaptive.identity) == (trend.label, trend.identity)
    assert adaptive.method == "hyperadam-tensor-adaptive"
    assert trend.method == "hyperadam-tensor-trend"
    cell = {"identity": adaptive.identity, "method": adaptive.method, "runs": 2, "seed": 0,
            "unstable_rule": "checkpoints"}  # fmt: skip
    previous = {"results": {"task": {adaptive.label: cell}}}
    assert unchanged_cell(previous, "task", adaptive, 2, 0) == cell
    assert unchanged_cell(previous, "task", trend, 2, 0) is None
    legacy = {k: v for k, v in cell.items() if k != "method"}  # before cells named their method
    previous["results"]["task"][adaptive.label] = legacy
    assert unchanged_cell(previous, "task", adaptive, 2, 0) == legacy
    assert unchanged_cell(previous, "task", trend, 2, 0) is None
    # A cell judged by the first instability rule is rerun, not kept.
    previous["results"]["task"][adaptive.label] = {
        k: v for k, v in cell.items() if k != "unstable_rule"
    }
    assert unchanged_cell(previous, "task", adaptive, 2, 0) is None
    record = {"source": str(theta), "identity": adaptive.identity, "method": adaptive.method}
    candidates = {"candidates": {adaptive.label: record}}
    assert replaced_candidates(candidates, [trend]) == {adaptive.label: trend.label}
    assert replaced_candidates(candidates, [adaptive]) == {}
