"""The reproduction grid: every row of the paper's tables, our figure beside the paper's (issue 6).

``run_grid`` evaluates each optimizer on each task of the chosen rows with the evaluation
protocol of ``meta_train.evaluate`` (identical seeds for every optimizer) and returns plain
JSON-ready results; ``write_report`` turns them into ``results.md`` and loss-curve PNGs. Every
number in the report is read from those results, never typed in, except the paper's figures
(``meta_train.paper``). A hand-written analysis between the ANALYSIS markers of an existing
report is kept when the report is regenerated.

Besides the paper's four optimizers, a sitting may judge *candidate* θs (issue 15): any θ file
or folder ``meta_train.theta_source`` loads, labelled and fingerprinted as the held-out
benchmark does (``meta_train.benchmark.describe_optimizer``: ``<name>@<digest>``), run at its
own default lr and bound to each task's tensor layout. The report shows each as a column beside
the paper's tables and says, per candidate, on how many rows it is at or below the paper's
HyperAdam/Adam ratio, how many of its runs were unstable (the held-out benchmark's rule,
``meta_train.benchmark.unstable_by_checkpoints``: its last iterate's held-out loss above 1.5×
the lowest of 20 evenly spaced iterates', measured on batches the run never trains on) and how
its Table 3 test accuracy compares with Adam's. Cells judged by the first rule (the lowest
smoothed minibatch loss, which over-counts on short noisy runs) are rerun when their θ is named
again and shown apart until then.

Under ``engine="runtime"`` the candidates step through their exported ONNX step
(``meta_train.runtime_rule.ExportedRule``, several times faster than the torch reference on the
large rows) and their labels and identities end in ``RUNTIME_SUFFIX``, as the held-out
benchmark's do, so a merged report never puts a reference cell and a runtime cell of one θ
under one name. The paper's four keep the reference, which is what the committed report records.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .benchmark import (
    ENGINES,
    RUNTIME_SUFFIX,
    UNSTABLE_FACTOR,
    UNSTABLE_RULE,
    OptimizerSpec,
    describe_optimizer,
    runtime_source,
    same_method,
    unstable_by_checkpoints,
)
from .errors import UsageError
from .evaluate import UNSTABLE_CHECKPOINTS, RunResult, evaluate
from .paper import GRID, OPTIMIZERS, GridRow
from .process_pool import init_worker
from .resolve import resolve_optimizer

QUICK_TASKS = ("mnist-nn-sigmoid-100", "sin-lstm")
QUICK_RUNS = 2
ANALYSIS_BEGIN = "<!-- ANALYSIS BEGIN: hand-written, kept when the report is regenerated -->"
ANALYSIS_END = "<!-- ANALYSIS END -->"


LONG_HORIZON = 2000  # rows at or beyond this many steps use ``long_runs``


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """One sitting of the grid.

    ``engine`` says how the candidate θs step: ``"reference"`` (the torch reference) or
    ``"runtime"`` (their exported ONNX step; ``run_grid``'s ``folders`` names the export of each
    θ file). The paper's four run on the reference under either.
    """

    tasks: tuple[str, ...] = ()  # empty = every task of the grid
    optimizers: tuple[str, ...] = OPTIMIZERS  # the paper's names, or θ files/folders
    runs: int = 10
    seed: int = 0
    data_dir: str | None = None
    quick: bool = False
    long_runs: int | None = None  # runs for horizons >= LONG_HORIZON (None: ``runs``)
    jobs: int = 1  # cells evaluated in parallel processes (results do not depend on it)
    engine: str = "reference"  # how the candidates step (ENGINES)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if self.runs < 1:
            raise UsageError(f"--runs must be >= 1, got {self.runs}")
        if self.long_runs is not None and self.long_runs < 1:
            raise UsageError(f"--long-runs must be >= 1, got {self.long_runs}")
        if self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {self.jobs}")
        known = {row.task for row in GRID}
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise UsageError(f"unknown task(s) {unknown}; the grid has {sorted(known)}")

    def rows(self) -> list[GridRow]:
        """The rows evaluated in this run."""
        tasks = self.tasks or (QUICK_TASKS if self.quick else ())
        return [row for row in GRID if not tasks or row.task in tasks]

    def report_rows(self) -> list[GridRow]:
        """The rows the report shows: all of the paper's (unrun ones say so), or the quick ones."""
        return self.rows() if self.quick else list(GRID)

    def runs_for(self, horizon: int) -> int:
        if horizon >= LONG_HORIZON and self.long_runs is not None:
            return self.long_runs
        return self.runs


@functools.lru_cache(maxsize=4)
def _task(task_key: str, data_dir: str | None):
    from .tasks.suite import build_test_task

    return build_test_task(task_key, data_dir=data_dir)


def resolve_optimizers(
    sources: tuple[str, ...] | list[str],
    *,
    engine: str = "reference",
    folders: Mapping[str, str] | None = None,
) -> list[OptimizerSpec]:
    """The optimizers of a sitting: the paper's four by name, candidate θs by path.

    Each is labelled and fingerprinted by ``describe_optimizer`` (a candidate's label is
    ``<folder or file stem>@<first 8 hex of its θ digest>``); a θ named twice (its file and its
    folder) is evaluated once. Under ``engine="runtime"`` each candidate steps through its
    exported folder: ``folders[source]`` for a θ file (the command exports it), the source itself
    for an exported folder; its label and identity then end in ``RUNTIME_SUFFIX``.

    Raises:
      UsageError: a source that is neither one of the paper's names nor a θ file or folder that
        loads, or (runtime) a θ file with no export, before anything runs.
    """
    specs: dict[str, OptimizerSpec] = {}
    for source in sources:
        if source not in OPTIMIZERS and not Path(source).exists():
            raise UsageError(
                f"--optimizers {source}: not one of {', '.join(OPTIMIZERS)} and no θ file or "
                "folder there"
            )
        folder = None
        if engine == "runtime" and source not in OPTIMIZERS:
            folder = runtime_source(source, folders or {}, flag="--optimizers")
        spec = describe_optimizer(source, flag="--optimizers", folder=folder)
        specs.setdefault(spec.label, spec)
    return list(specs.values())


def is_candidate(label: str) -> bool:
    """Whether a column of the report is a candidate θ rather than one of the paper's four."""
    return label not in OPTIMIZERS


def candidate_info(spec: OptimizerSpec) -> dict[str, Any]:
    """What the report records of a candidate: where its θ came from, which θ, its lr, and
    (``engine``, only when it is not the reference) how it stepped."""
    from runtime.theta import load_theta, theta_path

    from .theta_source import load_theta_source

    optimizer, _ = load_theta_source(spec.source)
    info = {
        "source": spec.source,
        "identity": spec.identity,
        "method": load_theta(theta_path(spec.source)).method,
        "lr": optimizer.default_lr,
    }
    if spec.folder is not None:  # a reference candidate's record stays as it was
        info["engine"] = "runtime"
    return info


def describe_candidate(info: dict[str, Any]) -> str:
    """The report's one line on a candidate θ."""
    engine = ", through its exported ONNX step (onnxruntime)" if info.get("engine") else ""
    return (
        f"candidate θ `{info['source']}` ({info['method']}, θ digest {info['identity']}), at "
        f"its default lr {info['lr']:g}, no per-task tuning{engine}"
    )


def evaluate_cell(
    task_key: str,
    name: str,
    runs: int,
    seed: int,
    data_dir: str | None,
    folder: str | None = None,
    lr: float | None = None,
) -> dict:
    """One (task, optimizer) cell of the grid as JSON-ready results (or why there are none).

    ``name`` is one of the paper's optimizers or a θ file or folder; with ``folder`` (its
    export, engine "runtime") it steps through the exported ONNX step instead of the torch
    reference, at the same lr. A learned rule is bound to the task's tensor layout (per-tensor
    variants normalise within each tensor; the others ignore it). Besides
    ``EvaluationResult.to_json``, the cell records per run whether it was unstable
    (``unstable``, judged by ``unstable_rule``: the held-out benchmark's). The iterates it
    measures for that are evaluated on their own batches: the final losses do not change.
    ``lr`` replaces the optimizer's own (the paper's tuned lr for Adam, a θ's default step);
    ``lr_sweep`` runs the grid's cells at multiples of it.
    """
    from .tasks.suite import TEST_TASKS

    spec = TEST_TASKS[task_key]
    try:
        rule, lr = resolve_optimizer(name, spec, lr=lr)
    except UsageError as error:
        return {"status": f"not available: {error}"}
    if folder is not None:
        from .runtime_rule import ExportedRule

        # The reference's lr, not the manifest's (an export takes a θ file's ``lr`` meta): the
        # two engines differ in how they step, never in what they are asked to do.
        exported = ExportedRule(folder, lr=lr)
        exported.name = rule.name + RUNTIME_SUFFIX  # the θ's path, not a temporary folder's
        rule = exported
    task = _task(task_key, data_dir)
    runs_seen: list[RunResult] = []
    result = evaluate(  # a per-tensor θ is bound to the task's tensor layout in run_once
        task,
        rule,
        task_name=task_key,
        steps=spec.horizon,
        runs=runs,
        seed=seed,
        lr=lr,
        with_test_metrics=spec.reports_test_accuracy,
        on_run=runs_seen.append,
        checkpoints=UNSTABLE_CHECKPOINTS,
    )
    return {
        **result.to_json(),
        "unstable": [unstable_by_checkpoints(r.checkpoint_losses, r.diverged) for r in runs_seen],
        "unstable_rule": UNSTABLE_RULE,
    }


def unchanged_cell(
    previous: dict[str, Any] | None, task_key: str, spec: OptimizerSpec, runs: int, seed: int
) -> dict[str, Any] | None:
    """The earlier cell of the same θ on the same runs, which a ``--merge`` sitting keeps.

    Only learned optimizers' cells are kept (their θ digest and method say the θ is
    unchanged); a cell of another θ, method, seed or number of runs, one from before cells
    recorded their θ, or one judged by an earlier instability rule, is rerun.
    """
    if previous is None or not spec.identity:
        return None
    old = previous.get("results", {}).get(task_key, {}).get(spec.label)
    if (
        old is None
        or "status" in old
        or old.get("identity") != spec.identity
        or not same_method(old, spec)
        or old.get("runs") != runs
        or old.get("seed") != seed
        or old.get("unstable_rule") != UNSTABLE_RULE
    ):
        return None
    return old


def run_grid(
    config: ReproduceConfig,
    *,
    log=print,
    previous: dict[str, Any] | None = None,
    folders: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluates every (task, optimizer) of the chosen rows; returns JSON-ready results.

    Every cell draws from the same seeds whatever ``config.jobs`` is, and the parallel processes
    use this process' torch thread count (which decides the order of float reductions), so
    running cells in parallel changes only the wall time. Cells are keyed by the optimizers'
    labels (``resolve_optimizers``) and record their θ's digest (``identity``). With
    ``previous`` (an earlier report, ``--merge``), a learned optimizer's cell of the same θ on
    the same runs is not rerun (``unchanged_cell``): the merge keeps it. Under
    ``config.engine == "runtime"``, ``folders`` maps each candidate θ file to its export (the
    exported folders, not sessions, go to the worker processes).
    """
    import torch

    from .tasks.suite import TEST_TASKS

    specs = resolve_optimizers(config.optimizers, engine=config.engine, folders=folders)
    results: dict[str, dict[str, Any]] = {}
    cells: list[tuple[str, OptimizerSpec, int]] = []
    for task_key in dict.fromkeys(row.task for row in config.rows()):
        results[task_key] = {}
        if task_key.startswith("cifar10") and config.data_dir is None:
            for spec in specs:
                results[task_key][spec.label] = {
                    "status": "CIFAR-10 not available here (--data-dir)"
                }
            continue
        try:  # missing data fails here, once, with a clear error
            _task(task_key, config.data_dir)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error).splitlines()[0]) from None
        runs = config.runs_for(TEST_TASKS[task_key].horizon)
        for spec in specs:
            if unchanged_cell(previous, task_key, spec, runs, config.seed) is not None:
                log(f"[reproduce] {task_key} × {spec.label}: kept (same θ, same {runs} runs)")
                continue
            cells.append((task_key, spec, runs))
    jobs = [
        (key, spec.source, runs, config.seed, config.data_dir, spec.folder)
        for key, spec, runs in cells
    ]
    for key, spec, runs in cells:
        log(f"[reproduce] {key} × {spec.label} ({runs} runs, {TEST_TASKS[key].horizon} steps)")
    if config.jobs == 1:
        outputs = [evaluate_cell(*job) for job in jobs]
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded torch
        with concurrent.futures.ProcessPoolExecutor(
            config.jobs,
            mp_context=context,
            initializer=init_worker,  # threads, and exit with this process
            initargs=(torch.get_num_threads(),),
        ) as pool:
            outputs = list(pool.map(evaluate_cell, *zip(*jobs, strict=True)))
    for (key, spec, _), output in zip(cells, outputs, strict=True):
        results[key][spec.label] = (
            output
            if "status" in output
            else {**output, "identity": spec.identity, "method": spec.method}
        )
    report = {
        "config": dataclasses.asdict(config),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} CPUs",
        "results": results,
    }
    candidates = {s.label: candidate_info(s) for s in specs if is_candidate(s.label)}
    if candidates:  # a report of the paper's four alone stays as it was
        report["candidates"] = candidates
    return report


def _value(entry: dict[str, Any], metric: str) -> float | None:
    if "status" in entry:
        return None
    if metric == "final_loss":
        return entry["final_loss_mean"]
    return entry.get(f"{metric}_mean")


def _std(entry: dict[str, Any], metric: str) -> float | None:
    if "status" in entry:
        return None
    return entry["final_loss_std"] if metric == "final_loss" else entry.get(f"{metric}_std")


def format_ours(entry: dict[str, Any] | None, metric: str) -> str:
    """``mean ± std (n)`` of one cell, or why there is no number."""
    if entry is None:
        return "not run"
    if "status" in entry:
        return entry["status"].split(":")[0]
    mean, std = _value(entry, metric), _std(entry, metric)
    if mean is None:
        return "n/a"
    diverged = f", {entry['diverged_runs']} diverged" if entry.get("diverged_runs") else ""
    if not math.isfinite(mean):
        return f"diverged ({entry['runs']}{diverged})"
    if entry["runs"] == 1:  # one run has no spread to show
        return f"{mean:.4f} ({entry['runs']}{diverged})"
    return f"{mean:.4f} ± {std:.4f} ({entry['runs']}{diverged})"


def _paper(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _paired_final_losses(
    learned: dict[str, Any], adam: dict[str, Any]
) -> tuple[float, float, int] | None:
    """Mean final losses over the runs both cells have: run r of every optimizer uses the same
    seed, so cells of different sizes (e.g. 1 run against 3) compare on their common runs."""
    if "final_losses" not in learned or "final_losses" not in adam:
        return None
    if learned.get("seed") != adam.get("seed"):
        return None
    n = min(len(learned["final_losses"]), len(adam["final_losses"]))
    if n == 0:
        return None
    return sum(learned["final_losses"][:n]) / n, sum(adam["final_losses"][:n]) / n, n


def ratio_rows(
    rows: list[GridRow], results: dict[str, Any], learned_name: str = "hyperadam"
) -> list[dict[str, Any]]:
    """``learned_name``/Adam ratio per row, ours beside the paper's HyperAdam/Adam (lower is
    better); one entry per row with a loss metric, ``ours`` None where a cell is missing.

    Final losses are compared run by run on the runs both cells have (``runs``); test metrics,
    stored as means only, are compared as means of the two cells.
    """
    out = []
    for row in rows:
        if row.metric not in ("final_loss", "test_loss"):
            continue
        cells = results.get(row.task, {})
        learned, adam = cells.get(learned_name), cells.get("adam")
        ours: float | None = None
        runs: int | None = None
        mean_learned: float | None
        mean_adam: float | None
        if learned and adam and "status" not in learned and "status" not in adam:
            paired = _paired_final_losses(learned, adam) if row.metric == "final_loss" else None
            if paired is not None:
                mean_learned, mean_adam, runs = paired
            else:
                mean_learned, mean_adam = _value(learned, row.metric), _value(adam, row.metric)
                runs = min(learned["runs"], adam["runs"])
            if mean_learned is not None and mean_adam:
                ours = mean_learned / mean_adam
        paper_learned, paper_adam = row.paper.get("hyperadam"), row.paper.get("adam")
        out.append(
            {
                "row": f"{row.section}: {row.label}",
                "paper": (
                    paper_learned / paper_adam
                    if paper_learned is not None and paper_adam is not None
                    else None
                ),
                "ours": ours,
                "runs": runs,
            }
        )
    return out


def report_optimizers(report: dict[str, Any]) -> list[str]:
    """The optimizers with a cell anywhere in the report, in the grid's order (a merged report
    shows every sitting's optimizers, not only the last sitting's)."""
    present = {name for cells in report["results"].values() for name in cells}
    known = [name for name in OPTIMIZERS if name in present]
    return known + sorted(present - set(known))


def _ratio_cells(ratio: dict[str, Any]) -> list[str]:
    """A ratio table's ``ours | runs compared | ours ≤ paper`` for one optimizer and row."""
    if ratio["ours"] is None:
        return ["not run", "—", "—"]
    paper = ratio["paper"]
    verdict = "—" if paper is None else ("yes" if ratio["ours"] <= paper else "no")
    return [f"{ratio['ours']:.2f}", str(ratio["runs"]), verdict]


def unstable_runs(results: dict[str, Any], label: str) -> dict[str, Any]:
    """How many of ``label``'s runs were unstable, over every task of the report, and where.

    ``unrecorded`` counts the cells from before cells recorded instability (not judged) and
    ``old_rule`` those judged by the first rule (the smoothed minibatch minimum): neither is
    counted.
    """
    count: dict[str, Any] = {
        "unstable": 0, "runs": 0, "tasks": 0, "unrecorded": 0, "old_rule": 0, "where": []
    }  # fmt: skip
    for task_key, cells in results.items():
        cell = cells.get(label)
        if cell is None or "status" in cell:
            continue
        if "unstable" not in cell:
            count["unrecorded"] += 1
            continue
        if cell.get("unstable_rule") != UNSTABLE_RULE:
            count["old_rule"] += 1
            continue
        count["unstable"] += sum(cell["unstable"])
        count["runs"] += len(cell["unstable"])
        count["tasks"] += 1
        if any(cell["unstable"]):
            count["where"].append(task_key)
    return count


def accuracy_rows(rows: list[GridRow], results: dict[str, Any], label: str) -> list[dict]:
    """Table 3's test accuracies of ``label`` beside Adam's (means of the cells); None where
    a cell is missing or holds no test metrics."""
    out = []
    for row in rows:
        if row.section != "Table 3" or not row.metric.startswith("test_top"):
            continue
        cells = results.get(row.task, {})
        values = [cells.get(name) for name in (label, "adam")]
        ours, adam = (None if v is None else _value(v, row.metric) for v in values)
        out.append({"row": row.label, "ours": ours, "adam": adam})
    return out


def _candidate_summary(rows: list[GridRow], results: dict[str, Any], label: str) -> list[str]:
    """The summary table's cells for one optimizer: rows at or below the paper's ratio,
    unstable runs, Table 3's test accuracy against Adam's."""
    judged = [r for r in ratio_rows(rows, results, label) if r["paper"] is not None]
    run = [r for r in judged if r["ours"] is not None]
    met = sum(r["ours"] <= r["paper"] for r in run)
    rows_cell = f"{met} of {len(judged)}"
    if len(run) < len(judged):
        rows_cell += f" ({len(run)} run)"
    count = unstable_runs(results, label)
    unstable = "—"
    if count["runs"]:
        where = "".join(f"; {task}" for task in count["where"])
        unstable = f"{count['unstable']} of {count['runs']} ({count['tasks']} tasks{where})"
    if count["unrecorded"]:
        unstable += f"; {count['unrecorded']} tasks not recorded"
    if count["old_rule"]:
        unstable += f"; {count['old_rule']} tasks judged by the first rule (not counted)"
    accuracies = []
    for acc in accuracy_rows(rows, results, label):
        if acc["ours"] is None or acc["adam"] is None:
            accuracies.append(f"{acc['row']}: not run")
            continue
        verdict = "at or above" if acc["ours"] >= acc["adam"] else "below"
        accuracies.append(
            f"{acc['row']} {100 * acc['ours']:.2f} % vs {100 * acc['adam']:.2f} % ({verdict})"
        )
    return [rows_cell, unstable, "; ".join(accuracies) or "—"]


def render_markdown(report: dict[str, Any], rows: list[GridRow], analysis: str) -> str:
    cfg, results = report["config"], report["results"]
    names = report_optimizers(report) or list(cfg["optimizers"])
    paper_names = [n for n in names if not is_candidate(n)]
    candidates = [n for n in names if is_candidate(n)]
    merged = len(report.get("sittings", ())) > 1
    runs = (
        "as each cell says"
        if merged
        else f"{cfg['runs']}"
        + (
            f" ({cfg['long_runs']} at horizons of {LONG_HORIZON}+ steps)"
            if cfg.get("long_runs")
            else ""
        )
    )
    lines = [
        "# Reproducing HyperAdam's tables",
        "",
        f"Generated by `hyperadam reproduce{' --quick' if cfg['quick'] else ''}` on "
        f"{report['created']} ({report['hardware']}); runs per cell: {runs}, seed "
        f"{cfg['seed']}. Every optimizer sees identical initialisations and minibatches (spec §4). "
        "Cells read `mean ± std (runs)`; the paper's figures are means of 100 runs "
        "(Fig. 5(d) read off the plot, ±0.05). Raw numbers: `results.json` beside this file.",
        "",
    ]
    if merged:
        lines += [
            f"Assembled from {len(report['sittings'])} sittings (`--merge`); each cell's runs, "
            "steps and seed are in `results.json`.",
            "",
        ]
    if report.get("optimizers"):
        lines += ["## The optimizers evaluated", ""]
        for name, info in report["optimizers"].items():
            lines.append(f"- **{name}**: {info}")
        lines.append("")
    for section in dict.fromkeys(row.section for row in rows):
        lines += [f"## {section}", ""]
        header = (
            ["row", "metric"]
            + [f"{n} (paper)" for n in paper_names]
            + [f"{n} (ours)" for n in names]
        )
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in (r for r in rows if r.section == section):
            cells = results.get(row.task, {})
            values = [_paper(row.paper.get(n)) for n in paper_names]
            values += [format_ours(cells.get(n), row.metric) for n in names]
            lines.append(
                f"| {row.label} (`{row.task}`) | {row.metric} | " + " | ".join(values) + " |"
            )
        lines.append("")
    # Each learned column's ratio to Adam, row by row: HyperAdam's, then each candidate's.
    per_name = [ratio_rows(rows, results, name) for name in ["hyperadam", *candidates]]
    shown = [i for i in range(len(per_name[0])) if any(p[i]["ours"] is not None for p in per_name)]
    if shown:
        header = ["row", "paper"]
        if candidates:  # then "ours" would not say whose
            for name in ["hyperadam", *candidates]:
                header += [name, "runs compared", f"{name} ≤ paper"]
        else:
            header += ["ours", "runs compared", "ours ≤ paper"]
        lines += [
            "## HyperAdam / Adam ratio (lower is better)",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for i in shown:
            first = per_name[0][i]
            paper = "—" if first["paper"] is None else f"{first['paper']:.2f}"
            values = [first["row"], paper] + [c for p in per_name for c in _ratio_cells(p[i])]
            lines.append("| " + " | ".join(values) + " |")
        judged = [r for r in per_name[0] if r["ours"] is not None and r["paper"] is not None]
        met = sum(r["ours"] <= r["paper"] for r in judged)
        lines += ["", f"At or below the paper's ratio on {met} of {len(judged)} rows.", ""]
    if candidates:
        lines += [
            "## Candidate θs on the paper's rows",
            "",
            "Each candidate at its own default lr, no per-task tuning, on the runs every optimizer "
            "sees. *Rows*: rows whose ratio to Adam is at or below the paper's HyperAdam/Adam "
            "ratio, of the rows the paper gives one for. *Unstable*: runs with a non-finite loss "
            f"or whose last iterate's loss is above {UNSTABLE_FACTOR:g}× the lowest loss of its "
            f"iterates at {UNSTABLE_CHECKPOINTS} evenly spaced steps, each measured on the same "
            "held-out batches (the held-out benchmark's definition), over every task of the "
            "report; cells judged by the first rule (the lowest smoothed minibatch loss) are "
            "not counted. *Table 3*: "
            "test accuracy (mean of the cell) against Adam's."
            + (
                f" Columns ending in `{RUNTIME_SUFFIX}` stepped through the candidate's exported "
                "ONNX step (`--engine runtime`), which agrees with the torch reference to "
                "round-off per step, not bitwise over a run."
                if any(name.endswith(RUNTIME_SUFFIX) for name in candidates)
                else ""
            ),
            "",
            "| optimizer | rows at or below the paper's ratio | unstable runs | "
            "Table 3 test accuracy vs Adam |",
            "|---|---|---|---|",
        ]
        for name in ["hyperadam", *candidates]:
            lines.append(
                f"| {name} | " + " | ".join(_candidate_summary(rows, results, name)) + " |"
            )
        lines.append("")
    lines += [
        "## Analysis",
        "",
        ANALYSIS_BEGIN,
        analysis.strip() or "(not written yet)",
        ANALYSIS_END,
        "",
    ]
    return "\n".join(lines)


def existing_analysis(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text()
    if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
        return text.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0]
    return ""


def plot_curves(report: dict[str, Any], figures_dir: Path) -> list[Path]:
    """One PNG per task: mean training loss per step for every optimizer (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, cells in report["results"].items():
        curves = {n: e["curve_mean"] for n, e in cells.items() if "curve_mean" in e}
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, curve in curves.items():
            ax.plot(range(len(curve)), curve, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(task)
        ax.legend()
        fig.tight_layout()
        path = figures_dir / f"{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def merge_reports(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` on top of ``previous``, cell by cell: rows run in several sittings make one report.

    Every cell keeps its own runs, steps and seed (``EvaluationResult.to_json``), so cells of
    different sittings stay self-describing; the sittings' configs are kept in ``sittings``.
    """
    results = {task: dict(cells) for task, cells in previous.get("results", {}).items()}
    for task, cells in new["results"].items():
        results.setdefault(task, {}).update(cells)
    sittings = previous.get("sittings") or [
        {k: previous[k] for k in ("config", "created", "hardware") if k in previous}
    ]
    sittings = [*sittings, {k: new[k] for k in ("config", "created", "hardware")}]
    optimizers = {**previous.get("optimizers", {}), **new.get("optimizers", {})}
    merged = {**new, "results": results, "sittings": sittings, "optimizers": optimizers}
    candidates = {**previous.get("candidates", {}), **new.get("candidates", {})}
    if candidates:
        merged["candidates"] = candidates
    return merged


def replaced_candidates(previous: dict[str, Any], specs: list[OptimizerSpec]) -> dict[str, str]:
    """Candidates of ``previous`` whose θ file now holds another θ: old label → new label.

    A candidate's label carries its θ's digest, so a retrained θ at the same path is a new
    column; its old column, of a θ that is no longer there, is dropped (``drop_optimizers``).
    The θ is compared, not the engine: the reference and runtime columns of one θ both stay.
    """
    from runtime.theta import theta_path

    def where(source: str) -> Path | None:
        try:
            return theta_path(source).resolve()
        except (FileNotFoundError, ValueError):
            return None

    def theta_digest(identity: str) -> str:
        return identity.removesuffix(RUNTIME_SUFFIX)

    replaced = {}
    for label, info in previous.get("candidates", {}).items():
        old = where(info["source"])
        for spec in specs:
            same_file = old is not None and old == where(spec.source)
            same_theta = theta_digest(spec.identity) == theta_digest(
                info["identity"]
            ) and same_method(info, spec)
            if is_candidate(spec.label) and same_file and not same_theta:
                replaced[label] = spec.label
    return replaced


def drop_optimizers(report: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """``report`` without the cells, descriptions and candidate records of ``labels``."""
    gone = set(labels)
    out = dict(report)
    out["results"] = {
        task: {n: c for n, c in cells.items() if n not in gone}
        for task, cells in report.get("results", {}).items()
    }
    for key in ("optimizers", "candidates"):
        if key in report:
            out[key] = {n: v for n, v in report[key].items() if n not in gone}
    return out


def changed_optimizers(previous: dict[str, Any], current: dict[str, str]) -> list[str]:
    """Built-in learned optimizers whose description (lineage, θ hash) differs from the one
    behind the cells of ``previous``: merging would put two different θ under one name. (A
    candidate's name carries its θ's digest: another θ is another name.)"""
    before = previous.get("optimizers", {})
    return [
        name
        for name, info in current.items()
        if not is_candidate(name) and name in before and before[name] != info
    ]


def report_json(report: dict[str, Any]) -> str:
    """``report`` as JSON text, keys sorted: one line per key, a list of numbers on one line.

    The loss curves (up to 10 000 floats per cell) are nearly all of the report; one value per
    line made the committed ``docs/results.json`` 5.8 MB and its diffs unreadable. Numbers are
    written with Python's shortest round-trip repr, so reading the file back gives every value
    bit for bit.
    """
    return _json_block(report, 0) + "\n"


def _json_block(value: Any, depth: int) -> str:
    inner, outer = " " * (depth + 1), " " * depth
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(k)}: {_json_block(v, depth + 1)}" for k, v in sorted(value.items())
        ]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [inner + _json_block(v, depth + 1) for v in value]
        return "[\n" + ",\n".join(items) + f"\n{outer}]"
    return json.dumps(value, separators=(",", ":"))


def write_report(report: dict[str, Any], config: ReproduceConfig, out_dir: Path) -> list[Path]:
    """Writes results.json, results.md and figures/*.png into ``out_dir``; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / "results.md"
    analysis = existing_analysis(md_path)
    json_path = out_dir / "results.json"
    json_path.write_text(report_json(report))
    md_path.write_text(render_markdown(report, config.report_rows(), analysis))
    return [md_path, json_path, *plot_curves(report, out_dir / "figures")]
