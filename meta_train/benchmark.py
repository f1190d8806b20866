"""The held-out benchmark: a learned optimizer against a tuned Adam on tasks it never trained on.

The yardstick of issue 15. For every task of ``HELDOUT_SUITE``:

1. **Adam is tuned** on a log-spaced grid of half-decades (10^(k/2); 1e-4 … 1e-1 by default),
   widened by a half-decade whenever the best lr sits at the grid's edge, on *tuning* runs whose
   seeds come from another stream than the evaluation runs' (``TUNING_STREAM``).
2. Every optimizer — tuned Adam, the learned ones at their default lr, no per-task tuning — runs
   the same *evaluation* runs: run r of seed S starts from the same initialisation and sees the
   same minibatches whatever the optimizer.
3. Per run: the training curve L(w_t; batch_t) smoothed by a trailing mean over
   ``smoothing_window(T)`` steps; the *final loss*, the loss of w_T averaged over
   ``HELD_OUT_BATCHES`` batches of a third stream (``evaluate.held_out_loss``); and whether the run
   was *unstable* (a non-finite loss or step, or a final loss above ``UNSTABLE_FACTOR`` × the lowest
   loss it had reached). "The lowest loss it had reached" is measured like the final loss, on the
   iterates at ``UNSTABLE_CHECKPOINTS`` evenly spaced steps: the lowest value of the noisy minibatch
   curve (the rule of the first sittings, kept as ``unstable_smoothed``) sits below the loss of any
   iterate, so it flagged ordinary noise — tuned Adam on a 100-step LayerNorm MLP: final 0.299,
   lowest smoothed minibatch loss 0.150 (×2.0), lowest checkpoint 0.255 (×1.17).

Per task and optimizer: the final-loss ratio to tuned Adam (mean over runs / Adam's mean over
the same runs) with a paired bootstrap CI; the *speed-up* (the step at which tuned Adam's mean
smoothed curve first reaches the optimizer's final smoothed loss, over T: below 1 means Adam
got there sooner; "> 1" when Adam never does within T); unstable runs. Across tasks: the IQM of
the ratios with a stratified bootstrap CI (runs resampled within each task), and the fraction
of tasks with ratio < 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from .evaluate import UNSTABLE_CHECKPOINTS, run_once
from .optimizers.base import UpdateRule
from .process_pool import init_worker
from .seeding import derive_seed
from .tasks.base import Task

UNSTABLE_FACTOR = 1.5
# How a cell's ``unstable`` flags were judged; a cell judged otherwise is rerun by a sitting.
UNSTABLE_RULE = "checkpoints"
CURVE_POINTS = 400  # stored points of each mean curve (the speed-up's resolution is T/400)
BOOTSTRAP_SAMPLES = 2000

# Seed streams: run r of seed S draws its init from (S, INIT, r), batch t from (S, BATCH, r, t).
EVAL_STREAM = 3
TUNING_STREAM = 5

DEFAULT_GRID = tuple(range(-8, -1))  # exponents k of 10^(k/2): 1e-4 … 1e-1
QUICK_GRID = (-6, -5, -4)  # 1e-3 … 1e-2
WIDEST_GRID = (-14, 0)  # 1e-7 … 1: the grid never grows past these


def grid_lr(k: int) -> float:
    """The learning rate 10^(k/2) of grid exponent ``k`` (half-decades)."""
    return float(10.0 ** (k / 2))


def smoothing_window(horizon: int) -> int:
    return max(1, horizon // 50)


def run_seed(seed: int, stream: int, run_index: int) -> int:
    return derive_seed(seed, stream, run_index)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run: the smoothed curve (full resolution), final loss, instability.

    ``unstable`` holds the final loss to the lowest checkpoint loss (``UNSTABLE_RULE``);
    ``unstable_smoothed`` to the lowest smoothed minibatch loss (the first sittings' rule).
    """

    smoothed: list[float]
    final_loss: float
    min_smoothed: float
    diverged: bool
    lowest_checkpoint: float = math.inf

    @property
    def unstable(self) -> bool:
        return self.diverged or _above_lowest(self.final_loss, self.lowest_checkpoint)

    @property
    def unstable_smoothed(self) -> bool:
        return self.diverged or _above_lowest(self.final_loss, self.min_smoothed)


def smooth(curve: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (fewer at the start)."""
    values = np.asarray(curve, dtype=np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return list((sums[idx] - sums[lo]) / (idx - lo))


@torch.no_grad()
def run_task(
    task: Task,
    rule: UpdateRule,
    *,
    steps: int,
    seed: int,
    checkpoints: int = UNSTABLE_CHECKPOINTS,
) -> RunRecord:
    """Runs ``rule`` for ``steps`` steps on ``task`` from the init and batches of ``seed``.

    The iterates at ``checkpoint_steps(steps, checkpoints)`` are measured like the final one
    (their own generators: the run's batches and result do not depend on ``checkpoints``; 0
    skips them, as Adam's tuning does, which reads final losses only).
    """
    run = run_once(
        task, rule, steps=steps, seed=seed, checkpoints=checkpoints, final_loss="held_out"
    )
    smoothed, lowest = smoothed_and_lowest(run.curve, steps)
    if run.diverged:
        return RunRecord(smoothed, math.inf, lowest, True)
    # Without checkpoints the run has reached its final loss at least.
    reached = min([run.final_loss, *(m for m in run.checkpoint_losses if math.isfinite(m))])
    return RunRecord(smoothed, run.final_loss, lowest, False, lowest_checkpoint=reached)


def smoothed_and_lowest(curve: Sequence[float], horizon: int) -> tuple[list[float], float]:
    """A run's curve smoothed over ``smoothing_window(horizon)`` steps, and its lowest finite
    value (inf when there is none)."""
    finite = [c if math.isfinite(c) else math.inf for c in curve]
    smoothed = smooth(finite, smoothing_window(horizon))
    return smoothed, min((s for s in smoothed if math.isfinite(s)), default=math.inf)


def _above_lowest(final: float, lowest: float) -> bool:
    return bool(final > UNSTABLE_FACTOR * lowest) if lowest > 0 else False


def unstable_by_checkpoints(checkpoint_losses: Sequence[float], diverged: bool) -> bool:
    """``UNSTABLE_RULE`` for a run of ``evaluate.run_once`` with checkpoints: diverged, or the
    held-out loss of its last iterate (the last of ``checkpoint_losses``) above
    ``UNSTABLE_FACTOR`` × the lowest held-out loss of its iterates."""
    if diverged:
        return True
    if not checkpoint_losses:
        raise ValueError("no measured iterates: run it with checkpoints (evaluate.run_once)")
    if not math.isfinite(checkpoint_losses[-1]):
        return True
    lowest = min(c for c in checkpoint_losses if math.isfinite(c))
    return _above_lowest(checkpoint_losses[-1], lowest)


# -- optimizers ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer of the benchmark: ``source`` is a baseline/built-in name or a path."""

    label: str
    source: str
    identity: str  # a digest of θ for learned optimizers; "" for hand-designed ones
    lr: float | None = None  # None: the optimizer's own default
    # Engine "runtime": the exported folder (or built-in name) whose ONNX step is evaluated.
    folder: str | None = None
    # A learned optimizer's method (θ's values alone do not say which step runs them: the
    # adaptive and trend variants' untrained starts are the same numbers); "" otherwise.
    method: str = ""


# The methods that existed before cells recorded their method: a stored cell without one is of
# one of these, so it is never taken for a cell of a later method with the same θ values.
METHODS_BEFORE_CELL_METHODS = frozenset(
    {"", "hyperadam", "dm", "rnnprop", "hyperadam-tensor", "hyperadam-tensor-unbounded",
     "hyperadam-tensor-adaptive"}
)  # fmt: skip


ENGINES = ("reference", "runtime")
# A runtime-engine result is labelled and fingerprinted apart from the reference's, so merged
# reports never mix the two (they agree to round-off per step, not bitwise over a trajectory).
RUNTIME_SUFFIX = "/ort"


def describe_optimizer(
    source: str, *, flag: str = "--optimizer", folder: str | None = None
) -> OptimizerSpec:
    """Resolves a name or path and fingerprints its θ (so results are tied to the θ behind them).

    ``flag`` names the command-line option in the error a bad source gets. ``folder`` (a learned
    optimizer only) evaluates it through that exported folder's runtime step instead of the
    torch reference: its label and identity then end in ``RUNTIME_SUFFIX``.
    """
    from .resolve import BASELINES, LEARNED

    if source in BASELINES:
        return OptimizerSpec(source, source, "")
    from .errors import UsageError
    from .theta_source import load_theta_source

    try:
        optimizer, theta = load_theta_source(source)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"{flag} {source}: {error}") from error
    flat = optimizer.flatten(theta).detach().numpy().astype(np.float32).tobytes()
    identity = hashlib.sha256(flat).hexdigest()[:16]
    if source in LEARNED:
        label = source
    else:
        from pathlib import Path

        path = Path(source)
        # An ablation arm's θ is <arm>/theta.npz: name it by its folder.
        name = path.parent.name if path.name == "theta.npz" else path.name.removesuffix(".npz")
        label = f"{name}@{identity[:8]}"
    if folder is not None:
        return OptimizerSpec(
            label + RUNTIME_SUFFIX,
            source,
            identity + RUNTIME_SUFFIX,
            folder=str(folder),
            method=optimizer.name,
        )
    return OptimizerSpec(label, source, identity, method=optimizer.name)


def make_rule(spec: OptimizerSpec, lr: float | None) -> UpdateRule:
    """The update rule of ``spec``: the torch reference, or the exported runtime step."""
    if spec.folder is not None:
        from .runtime_rule import ExportedRule
        from .theta_source import load_theta_source

        if lr is None:
            # The reference's α, not the manifest's (an export takes a θ file's ``lr`` meta),
            # as ``reproduce`` does: the two engines differ in how they step, never in what
            # they are asked to do, so ``…/ort`` and the reference's cell are of one θ.
            lr = load_theta_source(spec.source)[0].default_lr
        return ExportedRule(spec.folder, lr=lr)
    from .resolve import resolve_optimizer

    rule, _ = resolve_optimizer(spec.source, None, lr=lr)
    return rule


def runtime_source(source: str, folders: Mapping[str, str], *, flag: str) -> str:
    """Where a learned optimizer's runtime step comes from under engine "runtime": its export
    in ``folders`` (a θ file), else ``runtime_folder``; a θ file with no export is refused."""
    folder = folders.get(source) or runtime_folder(source)
    if folder is None:
        from .errors import UsageError

        raise UsageError(f"{flag} {source}: engine 'runtime' needs it exported first")
    return folder


def runtime_folder(source: str) -> str | None:
    """The runtime source of a learned optimizer that needs no export: a built-in name or an
    exported folder; None for a θ file (the caller exports it first)."""
    from pathlib import Path

    from runtime.manifest import MANIFEST_FILE

    from .resolve import LEARNED

    if source in LEARNED:
        return source
    return source if (Path(source) / MANIFEST_FILE).is_file() else None


# -- work units (picklable, so --jobs can farm them out) ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    task: str
    steps: int
    optimizer: OptimizerSpec
    lr: float | None
    seed: int
    checkpoints: int = UNSTABLE_CHECKPOINTS  # 0 for tuning runs (only their final loss counts)


def _run_unit(unit: Unit) -> RunRecord:
    task = _task_cache(unit.task)
    rule = make_rule(unit.optimizer, unit.lr)
    return run_task(task, rule, steps=unit.steps, seed=unit.seed, checkpoints=unit.checkpoints)


_TASKS: dict[str, Task] = {}


def _task_cache(key: str) -> Task:
    from .tasks.heldout import heldout_spec

    if key not in _TASKS:
        _TASKS[key] = heldout_spec(key).build()
    return _TASKS[key]


def run_units(units: Sequence[Unit], jobs: int) -> list[RunRecord]:
    if jobs <= 1 or len(units) <= 1:
        return [_run_unit(u) for u in units]
    import multiprocessing

    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,  # one thread, and exit with this process
        initargs=(1,),
    ) as pool:
        return list(pool.map(_run_unit, units))


# -- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that determines a benchmark's numbers (logged whole).

    Attributes:
      optimizers: sources (names or paths) to judge against tuned Adam.
      tasks: task keys (empty: the whole suite).
      runs: evaluation runs per task and optimizer.
      tuning_runs: Adam tuning runs per grid lr (seeds disjoint from the evaluation runs').
      seed: the seed of both streams.
      grid: the starting Adam grid, exponents k of 10^(k/2).
      quick: short horizons (each task's ``quick_horizon``) for tests and smoke runs.
      jobs: processes.
      engine: how learned optimizers step: ``"reference"`` (the torch reference) or
        ``"runtime"`` (their exported ONNX step through ``runtime``; ``run_benchmark``'s
        ``folders`` names the export of each θ file).
    """

    optimizers: tuple[str, ...]
    tasks: tuple[str, ...] = ()
    runs: int = 5
    tuning_runs: int = 2
    seed: int = 0
    grid: tuple[int, ...] = DEFAULT_GRID
    quick: bool = False
    jobs: int = 1
    engine: str = "reference"

    def __post_init__(self) -> None:
        from .errors import UsageError

        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if self.runs < 2:
            raise UsageError(f"--runs must be >= 2 (the CIs need two), got {self.runs}")
        if self.tuning_runs < 1:
            raise UsageError(f"tuning runs must be >= 1, got {self.tuning_runs}")
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        if self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {self.jobs}")
        if not self.grid or list(self.grid) != sorted(set(self.grid)):
            raise UsageError(f"the Adam grid must be increasing exponents, got {self.grid}")


def _horizon(spec: Any, quick: bool) -> int:
    return spec.quick_horizon if quick else spec.horizon


# -- Adam tuning --------------------------------------------------------------------------------


def tune_adam(
    key: str, steps: int, config: BenchmarkConfig, cached: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Adam's grid search on the tuning runs; widens the grid until the best lr is inside it.

    ``cached`` is an earlier tuning of the same task, steps, seeds and runs: its grid points
    are reused, not rerun.
    """
    adam = OptimizerSpec("adam", "adam", "")
    scores: dict[int, float] = {}
    if cached:
        scores = {int(k): float(v) for k, v in cached["scores"].items()}
    grid = sorted(set(config.grid) | set(scores))

    def score_missing(exponents: Sequence[int]) -> None:
        todo = [k for k in exponents if k not in scores]
        units = [
            Unit(key, steps, adam, grid_lr(k), run_seed(config.seed, TUNING_STREAM, r), 0)
            for k in todo
            for r in range(config.tuning_runs)
        ]
        records = run_units(units, config.jobs)
        n = config.tuning_runs
        for i, k in enumerate(todo):
            finals = [rec.final_loss for rec in records[i * n : (i + 1) * n]]
            scores[k] = float(np.mean(finals)) if all(map(math.isfinite, finals)) else math.inf

    score_missing(grid)
    while True:
        best = min(grid, key=lambda k: (scores[k], -k))
        if best == grid[0] and grid[0] > WIDEST_GRID[0]:
            grid.insert(0, grid[0] - 1)
        elif best == grid[-1] and grid[-1] < WIDEST_GRID[1]:
            grid.append(grid[-1] + 1)
        else:
            break
        score_missing(grid)
    return {
        "steps": steps,
        "tuning_runs": config.tuning_runs,
        "seed": config.seed,
        "scores": {str(k): scores[k] for k in grid},
        "best_exponent": best,
        "best_lr": grid_lr(best),
        "at_edge": best in (grid[0], grid[-1]),
    }


# -- metrics ------------------------------------------------------------------------------------


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle half (⌊n/4⌋ trimmed from each end)."""
    ordered = sorted(values)
    cut = len(ordered) // 4
    middle = ordered[cut : len(ordered) - cut]
    return float(np.mean(middle)) if middle else math.nan


def _ratio(opt: np.ndarray, adam: np.ndarray) -> float:
    if not np.all(np.isfinite(opt)):
        return math.inf
    denominator = float(np.mean(adam))
    return float(np.mean(opt)) / denominator if denominator > 0 else math.nan


def paired_bootstrap(
    opt: Sequence[float] | np.ndarray, adam: Sequence[float] | np.ndarray, rng: np.random.Generator
) -> tuple[float, float]:
    """95 % percentile CI of the ratio of means, resampling runs (paired by seed)."""
    a, b = np.asarray(opt), np.asarray(adam)
    draws = rng.integers(0, len(a), size=(BOOTSTRAP_SAMPLES, len(a)))
    ratios = [_ratio(a[d], b[d]) for d in draws]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def speedup(adam_curve: Sequence[float], opt_final_smoothed: float, horizon: int) -> dict:
    """Where tuned Adam's mean smoothed curve first reaches the optimizer's final value."""
    for t, value in enumerate(adam_curve):
        if value <= opt_final_smoothed:
            return {"adam_steps": t + 1, "speedup": (t + 1) / horizon, "adam_reaches": True}
    return {"adam_steps": None, "speedup": None, "adam_reaches": False}


def _mean_curve(records: Sequence[RunRecord], steps: int) -> list[float]:
    out = []
    for t in range(steps):
        values = [r.smoothed[t] if t < len(r.smoothed) else math.inf for r in records]
        out.append(float(np.mean(values)))
    return out


def _downsample(curve: Sequence[float]) -> dict[str, list]:
    n = len(curve)
    idx = sorted(set(np.linspace(0, n - 1, min(n, CURVE_POINTS)).round().astype(int).tolist()))
    return {"steps": [i + 1 for i in idx], "loss": [_finite_or_none(curve[i]) for i in idx]}


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _curve_values(stored: dict[str, list]) -> list[float]:
    return [math.inf if v is None else v for v in stored["loss"]]


def _stored_steps_to_reach(stored: dict[str, list], target: float, horizon: int) -> dict:
    for step, value in zip(stored["steps"], _curve_values(stored), strict=True):
        if value <= target:
            return {"adam_steps": step, "speedup": step / horizon, "adam_reaches": True}
    return {"adam_steps": None, "speedup": None, "adam_reaches": False}


# -- the benchmark ------------------------------------------------------------------------------


def run_benchmark(
    config: BenchmarkConfig,
    previous: dict[str, Any] | None = None,
    progress: Callable[[str], None] = print,
    on_task: Callable[[dict[str, Any]], None] | None = None,
    folders: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Runs the suite and returns the report (the JSON every number of the document comes from).

    ``previous`` is an earlier report with the same seed and runs: its Adam tunings and Adam
    evaluations are reused where the task, horizon and seeds match, and its other optimizers'
    results are kept unless this call reruns them. ``folders`` maps each θ-file optimizer to its
    exported folder under ``config.engine == "runtime"`` (built-ins and exported folders need
    none).
    """
    from .tasks.heldout import HELDOUT_KEYS, heldout_spec

    keys = config.tasks or HELDOUT_KEYS
    specs = [_describe(name, config.engine, folders or {}) for name in config.optimizers]
    prev_tasks = (previous or {}).get("tasks", {})
    report: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "optimizers": {s.label: {"source": s.source, "identity": s.identity} for s in specs},
        "tasks": {},
    }
    if previous:
        for label, info in previous.get("optimizers", {}).items():
            report["optimizers"].setdefault(label, info)
    # Every earlier task is kept until this sitting replaces it: the tasks it does not run, and
    # (so that a report saved after each task, and a sitting stopped halfway, lose nothing) the
    # ones it has not reached yet.
    for key, task in prev_tasks.items():
        if key in HELDOUT_KEYS and task.get("seed") == config.seed:
            report["tasks"][key] = task
    started = time.perf_counter()
    for key in keys:
        spec = heldout_spec(key)
        steps = _horizon(spec, config.quick)
        old = prev_tasks.get(key, {})
        reusable = (
            old.get("digest") == spec.digest()
            and old.get("steps") == steps
            and old.get("runs") == config.runs
            and old.get("seed") == config.seed
        )
        entry: dict[str, Any] = {
            "kind": spec.kind,
            "digest": spec.digest(),
            "steps": steps,
            "runs": config.runs,
            "seed": config.seed,
            "results": dict(old.get("results", {})) if reusable else {},
        }
        t0 = time.perf_counter()
        cached = old.get("adam_tuning") if reusable else None
        if cached and cached.get("tuning_runs") != config.tuning_runs:
            cached = None
        entry["adam_tuning"] = tune_adam(key, steps, config, cached)
        lr = entry["adam_tuning"]["best_lr"]
        adam_prev = entry["results"].get("adam")
        adam_spec = OptimizerSpec("adam", "adam", "", lr)
        todo = [
            s
            for s in specs
            if s.label != "adam" and not _current(entry["results"].get(s.label), s)
        ]  # a result of the same θ on the same runs, judged by today's rule, is kept
        if adam_prev is None or adam_prev.get("lr") != lr or not _current(adam_prev, adam_spec):
            todo.insert(0, adam_spec)
        seeds = [run_seed(config.seed, EVAL_STREAM, r) for r in range(config.runs)]
        units = [
            Unit(key, steps, s, s.lr if s.label == "adam" else None, seed)
            for s in todo
            for seed in seeds
        ]
        records = run_units(units, config.jobs)
        for i, s in enumerate(todo):
            runs = records[i * config.runs : (i + 1) * config.runs]
            entry["results"][s.label] = {
                "identity": s.identity,
                "method": s.method,
                "lr": s.lr if s.label == "adam" else None,
                "final_losses": [_finite_or_none(r.final_loss) for r in runs],
                "unstable": [r.unstable for r in runs],
                "unstable_rule": UNSTABLE_RULE,
                "unstable_smoothed": [r.unstable_smoothed for r in runs],
                "lowest_checkpoint": [_finite_or_none(r.lowest_checkpoint) for r in runs],
                "diverged": [r.diverged for r in runs],
                "curve": _downsample(_mean_curve(runs, steps)),
                "final_smoothed": _finite_or_none(
                    float(np.mean([r.smoothed[-1] if len(r.smoothed) == steps else math.inf
                                   for r in runs]))
                ),
            }  # fmt: skip
        # CPU-seconds of every sitting that worked on this task (the suite's cost adds these).
        entry["seconds"] = (old.get("seconds", 0.0) if reusable else 0.0) + (
            time.perf_counter() - t0
        )
        report["tasks"][key] = entry
        progress(f"{key}: Adam lr {lr:.3g}, {len(todo)} optimizer(s) in {entry['seconds']:.0f} s")
        if on_task is not None:  # lets a caller save the report so far (a sitting can stop)
            on_task(report)
    order = {k: i for i, k in enumerate(HELDOUT_KEYS)}
    report["tasks"] = dict(sorted(report["tasks"].items(), key=lambda kv: order.get(kv[0], 0)))
    report["wall_seconds"] = time.perf_counter() - started
    report["suite_seconds"] = sum(t.get("seconds", 0.0) for t in report["tasks"].values())
    report["summary"] = summarise(report)
    return report


def same_method(record: Mapping[str, Any], spec: OptimizerSpec) -> bool:
    """Whether a stored cell (or candidate record) is of ``spec``'s method; one without a
    ``method`` predates all but ``METHODS_BEFORE_CELL_METHODS``."""
    method = record.get("method")
    if method is None:
        return spec.method in METHODS_BEFORE_CELL_METHODS
    return bool(method == spec.method)


def _current(cell: dict[str, Any] | None, spec: OptimizerSpec) -> bool:
    """Whether a stored cell is of this θ and method and judged by today's instability rule
    (cells of the first sittings have no ``unstable_rule``: they are rerun when their optimizer
    is named; cells without a ``method`` predate all but ``METHODS_BEFORE_CELL_METHODS``)."""
    return (
        cell is not None
        and same_method(cell, spec)
        and cell.get("identity") == spec.identity
        and cell.get("unstable_rule") == UNSTABLE_RULE
    )


def _describe(source: str, engine: str, folders: Mapping[str, str]) -> OptimizerSpec:
    from .resolve import BASELINES

    if engine == "reference" or source in BASELINES:
        return describe_optimizer(source)
    return describe_optimizer(source, folder=runtime_source(source, folders, flag="--optimizer"))


def bootstrap_rng(*names: str) -> np.random.Generator:
    """The bootstrap stream of one cell (its task or tasks, and optimizer): seeded by names."""
    digest = hashlib.sha256("|".join(names).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Per task and optimizer: ratio with CI, speed-up, unstable runs; across tasks: IQM, CI.

    Every bootstrap draws from its own stream (``bootstrap_rng``), so a cell's CI is the same
    whichever other optimizers and tasks the report holds.
    """
    labels = sorted({lb for t in report["tasks"].values() for lb in t["results"]} - {"adam"})
    per_task: dict[str, dict[str, Any]] = {}
    finals: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {lb: {} for lb in labels}
    for key, task in report["tasks"].items():
        adam = task["results"]["adam"]
        adam_final = np.array([math.inf if v is None else v for v in adam["final_losses"]])
        per_task[key] = {}
        for label in labels:
            res = task["results"].get(label)
            if res is None:
                continue
            opt_final = np.array([math.inf if v is None else v for v in res["final_losses"]])
            finals[label][key] = (opt_final, adam_final)
            ratio = _ratio(opt_final, adam_final)
            lo, hi = paired_bootstrap(opt_final, adam_final, bootstrap_rng(key, label))
            target = res["final_smoothed"]
            speed = (
                _stored_steps_to_reach(adam["curve"], target, task["steps"])
                if target is not None
                else {"adam_steps": None, "speedup": None, "adam_reaches": True}
            )
            per_task[key][label] = {
                "ratio": ratio,
                "ci": [lo, hi],
                **speed,
                "unstable_runs": int(sum(res["unstable"])),
                # "smoothed": judged by the first sittings' rule (module docstring), biased up.
                "unstable_rule": res.get("unstable_rule", "smoothed"),
                "runs": len(res["final_losses"]),
            }
    from .tasks.heldout import HELDOUT_FAST

    overall = _overall(labels, finals, per_task)
    fast = {
        lb: {k: v for k, v in finals[lb].items() if k in HELDOUT_FAST}
        for lb in labels
        if set(HELDOUT_FAST) <= set(finals[lb])
    }
    return {
        "per_task": per_task,
        "overall": overall,
        "overall_fast": _overall(sorted(fast), fast, per_task),
    }


def _overall(
    labels: Sequence[str],
    finals: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    per_task: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """IQM of the per-task ratios with a stratified bootstrap CI (runs resampled per task)."""
    overall: dict[str, Any] = {}
    for label in labels:
        tasks = finals[label]
        if not tasks:
            continue
        rng = bootstrap_rng(*sorted(tasks), label)  # the same tasks give the same CI
        # ... whatever order the report holds them in (a sitting's, or its JSON's sorted keys).
        strata = [tasks[key] for key in sorted(tasks)]
        ratios = [_ratio(o, a) for o, a in strata]
        boot = []
        for _ in range(BOOTSTRAP_SAMPLES):
            sample = []
            for o, a in strata:
                d = rng.integers(0, len(o), size=len(o))
                sample.append(_ratio(o[d], a[d]))
            boot.append(iqm(sample))
        lo, hi = np.percentile(boot, [2.5, 97.5])
        overall[label] = {
            "tasks": len(ratios),
            "iqm_ratio": iqm(ratios),
            "iqm_ci": [float(lo), float(hi)],
            "fraction_below_1": float(np.mean([r < 1 for r in ratios])),
            "unstable_runs": int(sum(per_task[k][label]["unstable_runs"] for k in tasks)),
            "unstable_rule": _one_rule(per_task[k][label]["unstable_rule"] for k in tasks),
        }
    return overall


def _one_rule(rules: Iterable[str]) -> str:
    """The instability rule of a row: today's where every cell has it, else "smoothed"."""
    return UNSTABLE_RULE if set(rules) == {UNSTABLE_RULE} else "smoothed"


def dumps(report: dict[str, Any]) -> str:
    """The report as compact JSON (one line per task), non-finite numbers as null."""
    def clean(x: Any) -> Any:
        if isinstance(x, np.generic):
            x = x.item()
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(report), separators=(",", ":"), sort_keys=True) + "\n"
