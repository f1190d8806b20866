"""Promotion of a registered optimizer version: evaluate it against Adam, gate ``champion``.

``promote`` evaluates a version against Adam with its tuned learning rates on held-out tasks
(same seeds, so the same inits and minibatches for both), logs the evaluation either way (an
MLflow run plus ``eval.*`` version tags) and moves ``champion`` only if the gate passes: no
diverged candidate run, and the mean over tasks of candidate/Adam mean final loss ≤ the gate
ratio (default 1.0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import manifest as mf
from runtime import sources

from . import registry

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

# Held-out tasks of promotion: the meta-training task is the 784-20-10 sigmoid MLP
# (mnist-nn-sigmoid-100); these change the activation or the depth, and cost ~1 s per run.
DEFAULT_HELD_OUT_TASKS = ("mnist-nn-relu-100", "mnist-nn-tanh-100", "mnist-nn-l2-sigmoid-100")
DEFAULT_EVAL_RUNS = 5
DEFAULT_GATE = 1.0
DEFAULT_EXPERIMENT = "hyperadam"  # meta_train.run_config's; evaluation runs of orphan versions


@dataclasses.dataclass(frozen=True)
class TaskComparison:
    """Candidate vs tuned Adam on one task, over the same seeded runs."""

    task: str
    candidate_final_loss: float  # mean over runs (inf if any run diverged)
    adam_final_loss: float
    candidate_diverged: int  # runs
    adam_diverged: int
    candidate_lr: float
    adam_lr: float

    @property
    def ratio(self) -> float:
        if self.candidate_diverged:
            return math.inf
        if self.adam_diverged:  # the candidate finished where Adam did not
            return 0.0
        return self.candidate_final_loss / self.adam_final_loss


@dataclasses.dataclass(frozen=True)
class Promotion:
    """The outcome of ``promote``: the evaluation, the gate and where the alias points."""

    name: str
    version: int
    comparisons: tuple[TaskComparison, ...]
    runs: int
    steps: int | None
    seed: int
    gate: float
    evaluation_run_id: str
    champion_before: int | None
    champion_after: int | None

    @property
    def mean_ratio(self) -> float:
        return sum(c.ratio for c in self.comparisons) / len(self.comparisons)

    @property
    def diverged(self) -> int:
        return sum(c.candidate_diverged for c in self.comparisons)

    @property
    def passed(self) -> bool:
        return self.diverged == 0 and math.isfinite(self.mean_ratio) and (
            self.mean_ratio <= self.gate
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "gate": self.gate,
            "rule": "passed = no diverged candidate run and mean over tasks of "
            "(candidate mean final loss / Adam mean final loss) <= gate",
            "mean_ratio": self.mean_ratio,
            "passed": self.passed,
            "runs": self.runs,
            "steps": self.steps,
            "seed": self.seed,
            "tasks": [{**dataclasses.asdict(c), "ratio": c.ratio} for c in self.comparisons],
            "evaluation_run_id": self.evaluation_run_id,
            "champion_before": self.champion_before,
            "champion_after": self.champion_after,
        }


def compare_with_adam(
    folder: str | os.PathLike[str],
    tasks: Sequence[str],
    *,
    runs: int,
    steps: int | None,
    seed: int,
    data_dir: str | None = None,
) -> list[TaskComparison]:
    """Evaluates the exported optimizer in ``folder`` (at its manifest's α) and Adam (at each
    task's tuned lr, spec §5) with the same seeds: identical inits and minibatches.

    The candidate runs the torch reference of the folder's θ (hash-checked ``theta.npz``), which
    the export's recorded parity check ties to the graphs.
    """
    from meta_train.evaluate import evaluate
    from meta_train.resolve import resolve_optimizer
    from meta_train.tasks.heldout import HELDOUT_KEYS
    from meta_train.tasks.suite import TEST_TASKS, build_test_task

    manifest = mf.load_manifest(Path(folder))
    out = []
    for key in tasks:
        if key in HELDOUT_KEYS:
            out.append(
                _compare_heldout(
                    folder, key, manifest.default_lr, runs=runs, steps=steps, seed=seed
                )
            )
            continue
        spec = TEST_TASKS[key]
        task = build_test_task(key, data_dir=data_dir)
        horizon = steps or spec.horizon
        results = {}
        for which, name, lr in (
            ("adam", "adam", None),
            ("candidate", str(folder), manifest.default_lr),
        ):
            rule, rule_lr = resolve_optimizer(name, spec, lr=lr)
            results[which] = (
                evaluate(task, rule, task_name=key, steps=horizon, runs=runs, seed=seed),
                rule_lr,
            )
        (cand, cand_lr), (adam, adam_lr) = results["candidate"], results["adam"]
        out.append(
            TaskComparison(
                key,
                cand.final_loss_mean,
                adam.final_loss_mean,
                cand.diverged_runs,
                adam.diverged_runs,
                float(cand_lr),
                float(adam_lr),
            )
        )
    return out


def _compare_heldout(
    folder: str | os.PathLike[str],
    key: str,
    candidate_lr: float,
    *,
    runs: int,
    steps: int | None,
    seed: int,
) -> TaskComparison:
    """A task of the held-out benchmark (``meta_train.benchmark``): Adam tuned on its grid with
    tuning seeds, then both on the same evaluation runs; an unstable run counts as diverged.
    The candidate runs through its exported ONNX step (the runtime engine): the gate judges
    the artefact it promotes."""
    from meta_train.benchmark import (
        EVAL_STREAM,
        BenchmarkConfig,
        make_rule,
        run_seed,
        run_task,
        tune_adam,
    )
    from meta_train.benchmark import OptimizerSpec as Spec
    from meta_train.tasks.heldout import heldout_spec

    spec = heldout_spec(key)
    horizon = steps or spec.horizon
    tuned = tune_adam(key, horizon, BenchmarkConfig(optimizers=(), tuning_runs=1, seed=seed))
    task = spec.build()
    seeds = [run_seed(seed, EVAL_STREAM, r) for r in range(runs)]
    results = {}
    for which, source, lr in (
        ("adam", "adam", tuned["best_lr"]),
        ("candidate", str(folder), candidate_lr),
    ):
        folder_of = source if which == "candidate" else None
        rule = make_rule(Spec(which, source, "", folder=folder_of), lr)
        records = [run_task(task, rule, steps=horizon, seed=s) for s in seeds]
        finals = [r.final_loss for r in records]
        mean = sum(finals) / len(finals) if all(map(math.isfinite, finals)) else math.inf
        results[which] = (mean, sum(r.unstable for r in records), lr)
    (cand, cand_bad, cand_lr), (adam, adam_bad, adam_lr) = results["candidate"], results["adam"]
    return TaskComparison(key, cand, adam, cand_bad, adam_bad, float(cand_lr), float(adam_lr))


# `--tasks heldout-fast`: the fast subset of the held-out benchmark (issue 15's gate).
HELDOUT_FAST_ALIAS = "heldout-fast"


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    from meta_train.tasks.heldout import HELDOUT_FAST, HELDOUT_KEYS
    from meta_train.tasks.suite import TEST_TASKS

    if not tasks:
        raise ValueError("at least one held-out task is needed")
    expanded = [
        t for name in tasks for t in (HELDOUT_FAST if name == HELDOUT_FAST_ALIAS else [name])
    ]
    unknown = [t for t in expanded if t not in TEST_TASKS and t not in HELDOUT_KEYS]
    if unknown:
        known = sorted(TEST_TASKS) + list(HELDOUT_KEYS) + [HELDOUT_FAST_ALIAS]
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(expanded))


def promote(
    tracking_uri: str,
    name: str,
    version: int | str,
    *,
    tasks: Sequence[str] = DEFAULT_HELD_OUT_TASKS,
    runs: int = DEFAULT_EVAL_RUNS,
    steps: int | None = None,
    seed: int = 0,
    gate: float = DEFAULT_GATE,
    experiment: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    data_dir: str | None = None,
    registry_uri: str | None = None,
) -> Promotion:
    """Evaluates version ``version`` of ``name`` against tuned Adam and gates ``champion``.

    Order: download and verify the version; evaluate (``compare_with_adam``); log an evaluation
    run (params, per-task metrics, ``evaluation.json``) in ``experiment`` (default: the
    experiment of the run the version came from); tag the version ``eval.*``; only then, if
    the gate passed, point ``champion`` at the version. A failed gate leaves ``champion``
    where it was, and the evaluation stays logged.

    Args:
      tasks: held-out test-task keys (``meta_train.tasks.suite``).
      runs / steps / seed: per task, runs of ``steps`` steps (default: the task's horizon)
        with run seeds derived from ``seed``, the same for both optimizers.
      gate: the largest mean final-loss ratio to Adam that passes.

    Raises:
      LookupError: unknown model or version. ValueError: bad tasks, runs, steps or gate.
      ManifestError: the version's folder fails verification.
    """
    registry.check_model_name(name)
    tasks = check_tasks(tasks)
    if runs < 1 or (steps is not None and steps < 1):
        raise ValueError(f"runs and steps must be >= 1, got runs={runs}, steps={steps}")
    if not (math.isfinite(gate) and gate > 0):
        raise ValueError(f"gate must be a finite ratio > 0, got {gate}")
    client = registry.make_client(tracking_uri, registry_uri)
    mv = registry.model_version(client, name, str(version))
    champion_before = registry.registered_model(client, name).aliases.get(registry.CHAMPION)
    folder = sources.download_mlflow_uri(
        f"models:/{name}/{mv.version}",
        tracking_uri=tracking_uri,
        registry_uri=registry_uri or tracking_uri,
        cache_dir=cache_dir,
    )
    comparisons = compare_with_adam(
        folder, tasks, runs=runs, steps=steps, seed=seed, data_dir=data_dir
    )
    run_id = _start_evaluation_run(client, mv, experiment)
    before = None if champion_before is None else int(champion_before)
    result = Promotion(
        name, int(mv.version), tuple(comparisons), runs, steps, seed, gate, run_id, before, before
    )
    if result.passed:
        result = dataclasses.replace(result, champion_after=int(mv.version))
    _log_evaluation(client, result)
    if result.passed:
        client.set_registered_model_alias(name, registry.CHAMPION, mv.version)
    return result


def _start_evaluation_run(client: MlflowClient, mv: ModelVersion, experiment: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment_id = None
    if experiment is None and mv.run_id:
        try:
            experiment_id = client.get_run(mv.run_id).info.experiment_id
        except MlflowException:
            experiment_id = None  # the source run is gone: use the default experiment
    if experiment_id is None:
        from meta_train.tracking import get_or_create_experiment  # export depends on meta_train

        experiment_id = get_or_create_experiment(client, experiment or DEFAULT_EXPERIMENT)
    run = client.create_run(
        experiment_id,
        run_name=f"promote {mv.name} v{mv.version}",
        tags={
            "hyperadam.kind": "promotion",
            "hyperadam.registered_model": mv.name,
            "hyperadam.model_version": str(mv.version),
        },
    )
    return run.info.run_id


def _log_evaluation(client: MlflowClient, result: Promotion) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params = [
        Param("tasks", ",".join(c.task for c in result.comparisons)),
        Param("runs", str(result.runs)),
        Param("steps", "horizon" if result.steps is None else str(result.steps)),
        Param("seed", str(result.seed)),
        Param("gate", repr(result.gate)),
    ]
    metrics = [Metric("mean_ratio", _finite(result.mean_ratio), now, 0)]
    for c in result.comparisons:
        for key, value in (
            ("candidate_final_loss", c.candidate_final_loss),
            ("adam_final_loss", c.adam_final_loss),
            ("ratio", c.ratio),
            ("candidate_diverged_runs", c.candidate_diverged),
        ):
            metrics.append(Metric(f"{c.task}/{key}", _finite(value), now, 0))
    tags = [RunTag("hyperadam.gate_passed", str(result.passed))]
    client.log_batch(result.evaluation_run_id, metrics=metrics, params=params, tags=tags)
    client.log_dict(result.evaluation_run_id, result.to_json(), "evaluation.json")
    client.set_terminated(result.evaluation_run_id, "FINISHED")
    version_tags = {
        "mean_ratio": f"{result.mean_ratio:.6g}",
        "passed": str(result.passed),
        "gate": repr(result.gate),
        "tasks": ",".join(c.task for c in result.comparisons),
        "runs": str(result.runs),
        "steps": "horizon" if result.steps is None else str(result.steps),
        "seed": str(result.seed),
        "diverged_runs": str(result.diverged),
        "run_id": result.evaluation_run_id,
        "ratios": json.dumps({c.task: round(c.ratio, 6) for c in result.comparisons}),
    }
    for key, text in version_tags.items():
        tag = registry.EVAL_TAG + key
        client.set_model_version_tag(result.name, str(result.version), tag, text)


def _finite(value: float) -> float:
    # MLflow stores ±inf/NaN inconsistently across backends; a diverged run is logged as 1e308.
    return value if math.isfinite(value) else math.copysign(1e308, value)
