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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
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
