"""How far a per-task step size alone goes toward the paper's 100-step rows.

The paper's rows (Tables 1–2, Fig. 5(d)) ask a learned optimizer, at its one default lr, to end
below Adam's loss by the paper's HyperAdam/Adam ratio, with Adam at the paper's tuned lr per task
(spec §5). This module runs an optimizer at multiples of its lr through ``reproduce``'s own
cell (the same runs that ``hyperadam reproduce --runs R --seed S`` uses), beside Adam at the
paper's lr, and reports per row the loss at each multiple, the best multiple's ratio to that
Adam, and whether it reaches the paper's ratio.

The best multiple is chosen on the evaluation runs themselves, so this is an *oracle*: an upper
bound on what any rule that only picks a per-task step size for that optimizer could reach on
these runs. A row that no multiple of Adam's lr reaches asks for more than a step size.

A learned optimizer steps through the torch reference, or, given its export (``folder``),
through its exported ONNX step (``hyperadam lr-sweep --engine runtime``), as ``reproduce``'s
cells do; Adam always steps in torch. The command is ``meta_train/commands/lr_sweep_cmd.py``.

    hyperadam lr-sweep --optimizer adam --runs 10 --out runs/lr-sweep.json
    hyperadam lr-sweep --optimizer checkpoints/ablation/ARM/theta.npz --multipliers 1 2 \
        --engine runtime
    hyperadam lr-sweep --table docs/sweeps/decays*.json   # earlier sweeps as one table

``merge_tables`` renders several sweeps' JSON files as one table (docs/generalisation.md's are
made so): it refuses files that are not the same runs (runs, seed, engine, and Adam's loss on
every row they share, bit for bit), so a table never compares numbers from different runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import paper
from .errors import UsageError

DEFAULT_MULTIPLIERS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


def hundred_step_rows() -> dict[str, float]:
    """Task key → the paper's HyperAdam/Adam final-loss ratio, for every row of the paper's that
    reports both on a 100-step task (16 rows)."""
    from .tasks.suite import TEST_TASKS

    rows: dict[str, float] = {}
    for row in paper.GRID:
        learned, adam = row.paper.get("hyperadam"), row.paper.get("adam")
        if row.metric == "final_loss" and learned and adam and TEST_TASKS[row.task].horizon == 100:
            rows.setdefault(row.task, learned / adam)
    return rows


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One sweep (logged whole in its JSON)."""

    optimizer: str = "adam"  # a baseline name, a built-in or a θ file/folder
    multipliers: tuple[float, ...] = DEFAULT_MULTIPLIERS  # of the optimizer's own lr
    runs: int = 10
    seed: int = 0
    tasks: tuple[str, ...] = ()  # () = every 100-step paper row

    def __post_init__(self) -> None:
        multipliers = tuple(self.multipliers)
        if not multipliers or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m > 0
            for m in multipliers
        ):
            raise ValueError(f"multipliers must be positive finite numbers, got {multipliers!r}")
        object.__setattr__(self, "multipliers", tuple(sorted(set(map(float, multipliers)))))
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise ValueError(f"runs must be an integer >= 1, got {self.runs!r}")
        known = hundred_step_rows()
        unknown = [task for task in self.tasks if task not in known]
        if unknown:
            raise ValueError(
                f"not a 100-step paper row: {', '.join(unknown)} (rows: {', '.join(known)})"
            )
        object.__setattr__(self, "tasks", tuple(self.tasks))


# (task, optimizer, lr, runs, seed, the optimizer's export or None) → mean final loss
Evaluator = Callable[[str, str, float, int, int, "str | None"], float]


def _final_loss_mean(
    task_key: str, optimizer: str, lr: float, runs: int, seed: int, folder: str | None
) -> float:
    from .reproduce import evaluate_cell

    # reproduce's own cell, through the export's ONNX step where one is given
    cell = evaluate_cell(task_key, optimizer, runs, seed, None, folder=folder, lr=lr)
    if "status" in cell:
        raise UsageError(f"{optimizer} on {task_key}: {cell['status']}")
    return cell["final_loss_mean"]


def default_lr(optimizer: str, task_key: str) -> float:
    """The lr ``optimizer`` runs at on ``task_key`` unswept (raises ``UsageError`` for an
    unknown optimizer): the paper's for Adam, a θ's default step."""
    from .resolve import resolve_optimizer
    from .tasks.suite import TEST_TASKS

    return resolve_optimizer(optimizer, TEST_TASKS[task_key])[1]


def sweep(
    config: SweepConfig, evaluate: Evaluator = _final_loss_mean, *, folder: str | None = None
) -> dict[str, Any]:
    """Runs the sweep; returns ``{"config", "engine", "rows": {task: …}, "met", "of"}``.

    Each row holds the paper's ratio, Adam's paper lr and mean final loss, the optimizer's lr
    and mean final loss at each multiple, the best multiple and its ratio to Adam, and ``meets``
    (the ratio is at or below the paper's). ``folder`` is the optimizer's export: given, it
    steps through that ONNX step (engine "runtime"). ``evaluate(task, optimizer, lr, runs, seed,
    folder)`` is the mean final loss over the runs (a seam for tests).
    """
    rows = hundred_step_rows()
    out: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "engine": "reference" if folder is None else "runtime",
        "rows": {},
    }
    for task in config.tasks or tuple(rows):
        adam_lr = default_lr("adam", task)
        adam = evaluate(task, "adam", adam_lr, config.runs, config.seed, None)
        base_lr = default_lr(config.optimizer, task)
        losses: dict[str, float] = {}
        for multiple in config.multipliers:
            if config.optimizer == "adam" and multiple == 1.0:
                losses[repr(multiple)] = adam  # the same runs at the same lr
            else:
                losses[repr(multiple)] = evaluate(
                    task, config.optimizer, base_lr * multiple, config.runs, config.seed, folder
                )
        finite = {m: loss for m, loss in losses.items() if math.isfinite(loss)}
        best = min(finite, key=finite.__getitem__) if finite else None
        ratio = finite[best] / adam if best is not None else math.inf
        out["rows"][task] = {
            "paper_ratio": rows[task],
            "adam_lr": adam_lr,
            "adam_final_loss": adam,
            "lr": base_lr,
            "final_loss_by_multiple": losses,
            "best_multiple": None if best is None else float(best),
            "best_ratio": ratio,
            "meets": ratio <= rows[task],
        }
    out["met"] = sum(row["meets"] for row in out["rows"].values())
    out["of"] = len(out["rows"])
    return out


def format_table(result: dict[str, Any]) -> str:
    """The sweep as a markdown table."""
    lines = [
        "| row | paper ratio | best multiple of the lr | its ratio to Adam | meets |",
        "|---|---|---|---|---|",
    ]
    for task, row in result["rows"].items():
        best = "—" if row["best_multiple"] is None else f"×{row['best_multiple']:g}"
        lines.append(
            f"| `{task}` | {row['paper_ratio']:.3f} | {best} | {row['best_ratio']:.3f} | "
            f"{'yes' if row['meets'] else 'no'} |"
        )
    lines.append(f"\n{result['config']['optimizer']}: {result['met']} of {result['of']} rows met.")
    return "\n".join(lines)


def row_labels() -> dict[str, str]:
    """Task key → the row's name in the paper ("Table 1 sigmoid"), for each 100-step row."""
    labels: dict[str, str] = {}
    for row in paper.GRID:
        labels.setdefault(row.task, f"{row.section} {row.label}")
    return {task: labels[task] for task in hundred_step_rows()}


def optimizer_label(optimizer: str) -> str:
    """A short name for a table's column: a θ file's folder (the arm), else the name given."""
    path = Path(optimizer)
    return path.parent.name if path.suffix == ".npz" and path.parent.name else optimizer


def merge_tables(results: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Several sweeps (``(source, result)`` pairs: a file's name and its JSON) as one markdown
    table: a column per optimizer and multiple, each cell the loss's ratio to Adam (bold and
    starred where it is at or below the paper's ratio), and the rows met per column ("n of k"
    for a column run on k rows only). With one optimizer, a last column gives each row's best
    multiple.

    Raises ``ValueError`` where the sweeps are not the same runs: a different runs, seed or
    engine, Adam's loss on a shared row not bit-equal, or one optimizer's loss at one multiple
    given twice with different values."""
    adam, cells = _same_runs(results)
    order = list(dict.fromkeys(result["config"]["optimizer"] for _, result in results))
    columns = sorted(cells, key=lambda column: (order.index(column[0]), column[1]))
    single = len(order) == 1
    paper_ratios = hundred_step_rows()
    tasks = [task for task in paper_ratios if task in adam]

    def head(column: tuple[str, float]) -> str:
        return f"×{column[1]:g}" if single else f"{optimizer_label(column[0])} ×{column[1]:g}"

    lines = [
        f"| row | paper's ratio | {' | '.join(map(head, columns))} |"
        + (" best |" if single else ""),
        "|---|---|" + "---|" * (len(columns) + single),
    ]
    met = dict.fromkeys(columns, 0)
    best_met = 0
    for task, label in row_labels().items():
        if task not in adam:
            continue
        ratios = {c: cells[c][task] / adam[task] for c in columns if task in cells[c]}
        ratios = {c: r if math.isfinite(r) else math.inf for c, r in ratios.items()}
        texts = [
            _ratio_text(ratios[c], paper_ratios[task]) if c in ratios else "—" for c in columns
        ]
        for column, ratio in ratios.items():
            met[column] += ratio <= paper_ratios[task]
        if single:
            finite = {c: r for c, r in ratios.items() if math.isfinite(r)}
            best = min(finite, key=finite.__getitem__) if finite else None
            best_met += best is not None and finite[best] <= paper_ratios[task]
            texts.append("—" if best is None else f"×{best[1]:g}")
        lines.append(f"| {label} | {paper_ratios[task]:.3f} | {' | '.join(texts)} |")
    counts = []
    for column in columns:
        covered = sum(task in cells[column] for task in tasks)
        counts.append(str(met[column]) if covered == len(tasks) else f"{met[column]} of {covered}")
    lines.append(
        f"| **rows met, of {len(tasks)}** | | {' | '.join(counts)} |"
        + (f" **{best_met}** |" if single else "")
    )  # fmt: skip
    return "\n".join(lines)


def _ratio_text(ratio: float, paper_ratio: float) -> str:
    if not math.isfinite(ratio):
        return "non-finite"
    return f"**{ratio:.3f}***" if ratio <= paper_ratio else f"{ratio:.3f}"


def _same_runs(
    results: Sequence[tuple[str, dict[str, Any]]],
) -> tuple[dict[str, float], dict[tuple[str, float], dict[str, float]]]:
    """Adam's loss per row, and each (optimizer, multiple)'s loss per row, from sweeps checked
    to be the same runs (``merge_tables``)."""
    if not results:
        raise ValueError("no sweeps to merge")
    first_source, first = results[0]
    adam: dict[str, tuple[float, str]] = {}
    cells: dict[tuple[str, float], dict[str, float]] = {}
    for source, result in results:
        for key in ("runs", "seed"):
            if result["config"][key] != first["config"][key]:
                raise ValueError(
                    f"{source} has {key} {result['config'][key]}, {first_source} "
                    f"{first['config'][key]}: not the same runs"
                )
        if result["engine"] != first["engine"]:
            raise ValueError(
                f"{source} stepped through the {result['engine']} engine, {first_source} "
                f"through the {first['engine']}: a chaotic row amplifies the engines' round-off "
                "(docs/design.md), so one table keeps to one engine"
            )
        optimizer = result["config"]["optimizer"]
        for task, row in result["rows"].items():
            loss, seen_in = adam.setdefault(task, (row["adam_final_loss"], source))
            if loss != row["adam_final_loss"]:
                raise ValueError(
                    f"Adam's loss on {task} is {row['adam_final_loss']!r} in {source} and "
                    f"{loss!r} in {seen_in}: not the same runs"
                )
            for multiple, value in row["final_loss_by_multiple"].items():
                column = cells.setdefault((optimizer, float(multiple)), {})
                known = column.setdefault(task, value)
                if known != value and not (math.isnan(known) and math.isnan(value)):
                    raise ValueError(
                        f"{optimizer_label(optimizer)} ×{float(multiple):g} on {task} is given "
                        f"twice with different losses ({source})"
                    )
    return {task: loss for task, (loss, _) in adam.items()}, cells
