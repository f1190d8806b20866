"""The snapshot gate: keep the latest meta-training snapshot that holds its start's long runs.

PES on trajectories of at most 2 000 steps can learn a step that breaks at 10 000 (session 14's
cells-only arm: least squares and logistic regression blew up 10⁵-fold, though the arm's
meta-loss kept falling). Meta-training cannot see that, so it is checked afterwards: every
snapshot ``ablation --snapshot-minutes`` saved is run, newest first, on gate tasks (default: the
held-out fast subset's two 10 000-step convex rows) beside a reference θ (the arm's start) on the
benchmark's evaluation seeds (the same inits and minibatches for both), and the first one that
passes is kept. A snapshot passes when, on every gate task, none of its runs is unstable (the
benchmark's rule) and its mean final loss is at most ``tolerance`` × the reference's. The
paper's tasks (``tasks.suite``, e.g. its 100-step ReLU MLP, where a step learned on sigmoid
MLPs can blow up) can be gate tasks too, judged by the same rule.

    hyperadam snapshot-gate --reference checkpoints/ablation/<start>/theta.npz \\
        --snapshots runs/ablation/<arm>/theta.npz runs/ablation/<arm>/snapshots/*.npz \\
        --keep runs/ablation/<arm>-gated/theta.npz --out gate.json

The command (``meta_train/commands/snapshot_gate_cmd.py``) runs them through their exported
ONNX step by default, as the benchmark's ``--engine runtime`` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import benchmark
from .tasks.base import Task
from .tasks.heldout import HELDOUT_FAST, HELDOUT_KEYS, heldout_spec
from .tasks.suite import TEST_TASKS, build_test_task

# The fast subset's 10 000-step convex rows: where a learned step that outgrows its start shows.
DEFAULT_GATE_TASKS = ("leastsq-cond1e6-10000", "logreg-cond1e5-10000")
DEFAULT_TOLERANCE = 1.5
QUICK_STEPS = 20  # a paper task's horizon under ``quick`` (the held-out tasks have their own)
assert set(DEFAULT_GATE_TASKS) <= set(HELDOUT_FAST)


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """What the gate runs (logged whole in its report)."""

    tasks: tuple[str, ...] = DEFAULT_GATE_TASKS
    runs: int = 1  # evaluation runs per task (run r is the benchmark's evaluation run r)
    seed: int = 0
    tolerance: float = DEFAULT_TOLERANCE  # a snapshot's mean final loss ≤ this × reference's
    quick: bool = False  # each task's quick horizon (tests), not its own

    def steps(self, task: str) -> int:
        if task in TEST_TASKS:  # one of the paper's tasks
            horizon = TEST_TASKS[task].horizon
            return min(QUICK_STEPS, horizon) if self.quick else horizon
        spec = heldout_spec(task)
        return spec.quick_horizon if self.quick else spec.horizon

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("the gate needs at least one task")
        for key in self.tasks:
            if key not in HELDOUT_KEYS and key not in TEST_TASKS:
                raise KeyError(
                    f"unknown task {key!r}: neither a held-out task ({', '.join(HELDOUT_KEYS)}) "
                    f"nor one of the paper's ({', '.join(TEST_TASKS)})"
                )
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise ValueError(f"runs must be a positive int, got {self.runs!r}")
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance)
                and self.tolerance >= 1.0):  # fmt: skip
            raise ValueError(f"tolerance must be a finite number >= 1, got {self.tolerance!r}")


# (task, optimizer, steps, seed) -> the run's record
Runner = Callable[[str, benchmark.OptimizerSpec, int, int], benchmark.RunRecord]


_TASKS: dict[str, Task] = {}


def _task(key: str) -> Task:
    if key not in _TASKS:
        _TASKS[key] = heldout_spec(key).build() if key in HELDOUT_KEYS else build_test_task(key)
    return _TASKS[key]


def _run(task: str, spec: benchmark.OptimizerSpec, steps: int, seed: int) -> benchmark.RunRecord:
    # What the benchmark runs for one evaluation run: the same rule, task, seeds and judgement.
    rule = benchmark.make_rule(spec, None)
    return benchmark.run_task(_task(task), rule, steps=steps, seed=seed)


def _measure(
    spec: benchmark.OptimizerSpec, config: GateConfig, run: Runner
) -> dict[str, dict[str, Any]]:
    measured = {}
    for task in config.tasks:
        records = [
            run(
                task,
                spec,
                config.steps(task),
                benchmark.run_seed(config.seed, benchmark.EVAL_STREAM, r),
            )
            for r in range(config.runs)
        ]
        finals = [r.final_loss for r in records]
        measured[task] = {
            "final_losses": finals,
            "mean_final_loss": sum(finals) / len(finals),
            "unstable": sum(r.unstable for r in records),
        }
    return measured


def passes(measured: dict[str, dict[str, Any]], reference: dict[str, dict[str, Any]],
           tolerance: float) -> bool:  # fmt: skip
    """No unstable run on any gate task, and every task's mean final loss within ``tolerance``
    × the reference's (a non-finite mean never passes)."""
    return all(
        m["unstable"] == 0
        and math.isfinite(m["mean_final_loss"])
        and m["mean_final_loss"] <= tolerance * reference[task]["mean_final_loss"]
        for task, m in measured.items()
    )


def _updates(path: str | Path) -> int:
    from runtime.theta import load_theta

    updates = load_theta(path).meta.get("updates")
    if not isinstance(updates, int):
        raise ValueError(f"{path}: a snapshot's θ file must record its meta-training updates")
    return updates


def gate_snapshots(
    snapshots: Sequence[str | Path],
    reference: str | Path,
    config: GateConfig = GateConfig(),
    *,
    run: Runner = _run,
    folders: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Runs ``snapshots`` newest first (by their recorded updates) until one passes; returns
    the report: the config, the reference's losses, each snapshot tried, and ``kept`` (the path
    of the first to pass, or None when none does).

    ``folders`` maps a θ file (as given) to its exported folder: those step through the runtime
    (``benchmark.make_rule``), the others through the torch reference.
    """
    if not snapshots:
        raise ValueError("no snapshots to gate")
    folders = folders or {}
    # As given (``folders``' keys), each once, newest first.
    paths = sorted(dict.fromkeys(str(s) for s in snapshots), key=_updates, reverse=True)

    def describe(path: str | Path, flag: str) -> benchmark.OptimizerSpec:
        return benchmark.describe_optimizer(str(path), flag=flag, folder=folders.get(str(path)))

    reference_spec = describe(reference, "--reference")
    specs = [describe(p, "--snapshots") for p in paths]
    if any(spec.method != reference_spec.method for spec in specs):
        raise ValueError(f"every snapshot must be a {reference_spec.method} θ like the reference")
    report: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "rule": f"no unstable run ({benchmark.UNSTABLE_RULE}) and mean final loss <= "
        f"{config.tolerance} x the reference's on every task",
        "engine": "runtime" if folders else "reference",
        "reference": {
            "path": str(reference),
            "identity": reference_spec.identity,
            "tasks": _measure(reference_spec, config, run),
        },  # fmt: skip
        "snapshots": [],
        "kept": None,
    }
    tried: dict[str, dict[str, Any]] = {}  # identity → its entry
    for path, spec in zip(paths, specs, strict=True):
        entry: dict[str, Any] = {"path": path, "updates": _updates(path), "identity": spec.identity}
        if spec.identity in tried:  # the same θ under another name (the last snapshot, say)
            earlier = tried[spec.identity]
            entry.update(same_as=earlier["path"], tasks=earlier["tasks"], passed=earlier["passed"])
        else:
            measured = _measure(spec, config, run)
            passed = passes(measured, report["reference"]["tasks"], config.tolerance)
            entry.update(tasks=measured, passed=passed)
            tried[spec.identity] = entry
        report["snapshots"].append(entry)
        passed = entry["passed"]
        if passed:
            report["kept"] = str(path)
            break
    return report
