"""``hyperadam reproduce --quick``: the report's structure, and every number in it from the run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from mlflow import MlflowClient

from meta_train import cli
from meta_train.paper import GRID
from meta_train.reproduce import (
    ANALYSIS_BEGIN,
    ANALYSIS_END,
    QUICK_TASKS,
    ReproduceConfig,
    changed_optimizers,
    format_ours,
    merge_reports,
    ratio_rows,
    run_grid,
    write_report,
)

CELL = re.compile(r"(-?\d+\.\d{4}) ± (\d+\.\d{4}) \((\d+)\)")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    threads = torch.get_num_threads()  # the command sets its own; later tests keep theirs
    try:
        code = cli.main(["reproduce", "--quick", "--out", str(out / "docs"), "--tracking-uri", uri])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out / "docs", uri


def table_rows(markdown: str, section: str) -> list[list[str]]:
    block = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.slow  # quick_report runs the quick grid (≈ 50 s)
def test_report_has_every_quick_row_the_optimizers_and_the_figures(quick_report):
    docs, uri = quick_report
    markdown = (docs / "results.md").read_text()
    report = json.loads((docs / "results.json").read_text())
    assert set(report["results"]) == set(QUICK_TASKS)
    for name in ("adam", "dm", "rnnprop", "hyperadam"):
        assert f"- **{name}**: " in markdown  # how each optimizer was trained (or that it was not)
    sections = {row.section for row in GRID if row.task in QUICK_TASKS}
    for section in sections:
        rows = table_rows(markdown, section)
        expected = [row for row in GRID if row.section == section and row.task in QUICK_TASKS]
        assert [r[0] for r in rows] == [f"{row.label} (`{row.task}`)" for row in expected]
        for row, cells in zip(expected, rows, strict=True):
            # paper columns carry the paper's figures, verbatim
            assert cells[2] == f"{row.paper['adam']:g}"
            assert cells[5] == f"{row.paper['hyperadam']:g}"
    assert ANALYSIS_BEGIN in markdown and ANALYSIS_END in markdown
    for task in QUICK_TASKS:
        assert (docs / "figures" / f"{task}.png").stat().st_size > 1000
    run = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("hyperadam-reproduce").experiment_id]
    )[0]
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"results.md", "results.json", "figures"} <= logged


@pytest.mark.slow  # quick_report runs the quick grid (≈ 50 s)
def test_every_number_in_the_report_comes_from_results_json(quick_report):
    docs, _ = quick_report
    markdown = (docs / "results.md").read_text()
    report = json.loads((docs / "results.json").read_text())
    measured = set()
    for cells in report["results"].values():
        for entry in cells.values():
            if "final_loss_mean" in entry:
                measured.add(
                    (
                        f"{entry['final_loss_mean']:.4f}",
                        f"{entry['final_loss_std']:.4f}",
                        str(entry["runs"]),
                    )
                )
    found = set(CELL.findall(markdown))
    assert found, "no measured cell in the report"
    assert found <= measured
    assert all(runs == "2" for _, _, runs in found)  # --quick: 2 runs per cell
    # The ratio table is HyperAdam / Adam of those same numbers.
    for label, paper_ratio, ours, runs, verdict in table_rows(
        markdown, "HyperAdam / Adam ratio (lower is better)"
    ):
        task = next(r.task for r in GRID if f"{r.section}: {r.label}" == label)
        cells = report["results"][task]
        ratio = cells["hyperadam"]["final_loss_mean"] / cells["adam"]["final_loss_mean"]
        assert ours == f"{ratio:.2f}"
        assert runs == "2"
        assert verdict == ("yes" if ratio <= float(paper_ratio) else "no")


@pytest.mark.slow  # quick_report runs the quick grid (≈ 50 s)
def test_regenerating_keeps_the_hand_written_analysis(quick_report, tmp_path):
    docs, _ = quick_report
    report = json.loads((docs / "results.json").read_text())
    first = (docs / "results.md").read_text()
    (tmp_path / "results.md").write_text(
        first.replace(
            first.split(ANALYSIS_BEGIN)[1].split(ANALYSIS_END)[0], "\nOur reading of it.\n"
        )
    )
    write_report(report, ReproduceConfig(quick=True, runs=2), tmp_path)
    again = (tmp_path / "results.md").read_text()
    assert f"{ANALYSIS_BEGIN}\nOur reading of it.\n{ANALYSIS_END}" in again


def test_unknown_tasks_and_bad_runs_are_one_line_errors(capsys):
    assert cli.main(["reproduce", "--tasks", "mnist-nn-nope", "--tracking-uri", "none"]) == 2
    assert cli.main(["reproduce", "--runs", "0", "--tracking-uri", "none"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("hyperadam: error: unknown task(s) ['mnist-nn-nope']")
    assert err[1] == "hyperadam: error: --runs must be >= 1, got 0"


@pytest.mark.slow  # two processes running grid cells (≈ 20 s)
def test_parallel_cells_give_the_same_numbers_as_one_process():
    config = dict(tasks=("sin-lstm",), optimizers=("adam", "hyperadam"), runs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = run_grid(ReproduceConfig(**config), log=lambda _: None)["results"]
        parallel = run_grid(ReproduceConfig(**config, jobs=2), log=lambda _: None)["results"]
    finally:
        torch.set_num_threads(threads)
    assert serial == parallel
    assert serial["sin-lstm"]["adam"]["runs"] == 2


@pytest.mark.slow  # quick_report runs the quick grid (≈ 50 s)
def test_merge_keeps_earlier_cells_and_replaces_redone_ones(quick_report, tmp_path):
    docs, _ = quick_report
    first = json.loads((docs / "results.json").read_text())
    redo = {
        **first,
        "created": "later",
        "results": {"sin-lstm": {"adam": {**first["results"]["sin-lstm"]["adam"], "runs": 7}}},
    }
    merged = merge_reports(first, redo)
    assert merged["results"]["sin-lstm"]["adam"]["runs"] == 7
    assert merged["results"]["sin-lstm"]["hyperadam"] == first["results"]["sin-lstm"]["hyperadam"]
    assert merged["results"]["mnist-nn-sigmoid-100"] == first["results"]["mnist-nn-sigmoid-100"]
    assert [s["created"] for s in merged["sittings"]] == [first["created"], "later"]
    write_report(merged, ReproduceConfig(quick=True, runs=2), tmp_path)
    assert "Assembled from 2 sittings" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # quick_report runs the quick grid (≈ 50 s)
def test_the_full_report_shows_every_row_of_the_paper_even_unrun(quick_report, tmp_path):
    docs, _ = quick_report
    report = json.loads((docs / "results.json").read_text())
    report["config"] = {**report["config"], "quick": False}
    write_report(report, ReproduceConfig(tasks=QUICK_TASKS, runs=2), tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    for row in GRID:
        assert f"| {row.label} (`{row.task}`) | {row.metric} |" in markdown
    cnn = table_rows(markdown, "Table 3")[0]
    assert cnn[6:] == ["not run"] * 4


@pytest.mark.slow  # quick_report runs the quick grid (≈ 50 s)
def test_a_merged_report_shows_every_sittings_optimizers_and_lineage(quick_report, tmp_path):
    docs, _ = quick_report
    first = json.loads((docs / "results.json").read_text())
    only = ("dm", "rnnprop", "hyperadam")
    learned = {
        task: {n: e for n, e in cells.items() if n in only}
        for task, cells in first["results"].items()
    }
    adam = {task: {"adam": cells["adam"]} for task, cells in first["results"].items()}
    earlier = {**first, "results": learned, "config": {**first["config"], "optimizers": only}}
    later = {
        **first,
        "results": adam,
        "config": {**first["config"], "optimizers": ["adam"]},
        "optimizers": {"adam": first["optimizers"]["adam"]},
    }
    merged = merge_reports(earlier, later)
    assert merged["optimizers"] == first["optimizers"]  # the learned ones' lineage survives
    write_report(merged, ReproduceConfig(quick=True, runs=2), tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    header = markdown.split("## Table 1\n", 1)[1].split("\n")[1]
    assert header == (
        "| row | metric | adam (paper) | dm (paper) | rnnprop (paper) | hyperadam (paper) | "
        "adam (ours) | dm (ours) | rnnprop (ours) | hyperadam (ours) |"
    )
    assert "runs per cell: as each cell says" in markdown
    for name in ("adam", "dm", "rnnprop", "hyperadam"):
        assert f"- **{name}**: {first['optimizers'][name]}" in markdown


@pytest.mark.slow  # quick_report runs the quick grid (≈ 50 s)
def test_merging_refuses_a_learned_optimizer_whose_theta_changed(quick_report, tmp_path, capsys):
    docs, _ = quick_report
    first = json.loads((docs / "results.json").read_text())
    assert changed_optimizers(first, dict(first["optimizers"])) == []
    moved = {**first["optimizers"], "hyperadam": first["optimizers"]["hyperadam"] + ", retrained"}
    assert changed_optimizers(first, moved) == ["hyperadam"]
    # Through the CLI: refused before any cell runs, the report left as it was.
    first["optimizers"] = moved
    out = tmp_path / "docs"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(first))
    before = (out / "results.json").read_bytes()
    args = ["reproduce", "--merge", "--out", str(out), "--tracking-uri", "none"]
    code = cli.main([*args, "--tasks", "sin-lstm", "--runs", "1", "--optimizers", "hyperadam"])
    assert code == 2
    err = capsys.readouterr().err
    assert "hyperadam" in err and "another θ" in err
    assert (out / "results.json").read_bytes() == before
    assert not (out / "results.md").exists()


def test_the_ratio_compares_final_losses_on_the_runs_both_cells_have():
    row = next(r for r in GRID if r.task == "mnist-nn-sigmoid-2000")
    cell = {"seed": 0, "final_loss_mean": 0.0, "final_loss_std": 0.0}
    results = {
        row.task: {
            "adam": {**cell, "runs": 3, "final_losses": [1.0, 3.0, 5.0]},
            "hyperadam": {**cell, "runs": 1, "final_losses": [0.5]},
        }
    }
    (ratio,) = ratio_rows([row], results)
    assert ratio["ours"] == 0.5 and ratio["runs"] == 1  # run 0 against run 0, not against 3.0
    one = {**cell, "runs": 1, "final_losses": [0.5], "final_loss_mean": 0.5, "diverged_runs": 0}
    assert format_ours(one, "final_loss") == "0.5000 (1)"  # no spread to show for one run
