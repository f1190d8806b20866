"""The paper's evaluation protocol (spec §4): identical inits and minibatches for every optimizer.

Run r of an evaluation with seed S draws its initial parameters and its T minibatches from seeds
derived from (S, r) alone, so every optimizer sees exactly the same problem. The "final loss" of
a run is the loss of the final parameters w_T averaged over the same T minibatches used during
the run (spec §8 #11); the curve is the loss of w_t on batch t, before the update.

Optionally (``checkpoints``) a run also measures its iterates at evenly spaced steps and its
final one on ``HELD_OUT_BATCHES`` batches of a separate stream, which is how the held-out
benchmark and ``hyperadam reproduce`` judge a run unstable (``meta_train.benchmark``). Those
batches come from their own generators, so the run's curve and final loss do not depend on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from .optimizers.base import UpdateRule
from .seeding import derive_seed, generator
from .tasks.base import Task
from .unroll import batch_generator

HELD_OUT_STREAM = 7  # the seed stream of the batches that measure iterates
HELD_OUT_BATCHES = 10
UNSTABLE_CHECKPOINTS = 20  # iterates (steps 0, T/20, …) whose loss the final loss is held to


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run of one optimizer on one task."""

    curve: list[float]  # L(w_t; batch_t) for t = 0..T-1
    final_loss: float  # mean over t of L(w_T; batch_t), or over held-out batches (run_once)
    diverged: bool  # a non-finite loss or update appeared (the run stops there)
    test_metrics: dict[str, float]
    # With checkpoints: the held-out loss of the iterates at ``checkpoint_steps``, then of w_T
    # (absent when the run diverged); empty without.
    checkpoint_losses: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """Mean and spread over runs; ``to_json`` is the CLI's ``--json`` object."""

    task: str
    optimizer: str
    runs: int
    steps: int
    seed: int
    lr: float | None
    final_losses: list[float]
    curve_mean: list[float]
    test_metrics: dict[str, list[float]]
    diverged_runs: int

    @property
    def final_loss_mean(self) -> float:
        return _mean(self.final_losses)

    @property
    def final_loss_std(self) -> float:
        return _std(self.final_losses)

    def to_json(self) -> dict[str, Any]:
        out = {
            "task": self.task,
            "optimizer": self.optimizer,
            "runs": self.runs,
            "steps": self.steps,
            "seed": self.seed,
            "lr": self.lr,
            "final_loss_mean": self.final_loss_mean,
            "final_loss_std": self.final_loss_std,
            "final_losses": self.final_losses,
            "diverged_runs": self.diverged_runs,
            "curve_mean": self.curve_mean,
        }
        for name, values in self.test_metrics.items():
            out[f"test_{name}_mean"] = _mean(values)
            out[f"test_{name}_std"] = _std(values)
        return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))


def checkpoint_steps(steps: int, checkpoints: int = UNSTABLE_CHECKPOINTS) -> set[int]:
    """The steps whose iterates are measured like the final one: 0, T/n, 2T/n, … (< T)."""
    return {k * steps // checkpoints for k in range(checkpoints)} if checkpoints else set()


def held_out_loss(task: Task, w: torch.Tensor, seed: int) -> float:
    """The loss of ``w`` averaged over the ``HELD_OUT_BATCHES`` batches of run ``seed``'s
    held-out stream (no batch the run trains on)."""
    total = sum(
        float(task.loss(w, task.sample_batch(generator(seed, HELD_OUT_STREAM, e))))
        for e in range(HELD_OUT_BATCHES)
    )
    return total / HELD_OUT_BATCHES


def run_seed(seed: int, run_index: int) -> int:
    """The seed of run ``run_index`` of an evaluation with seed ``seed``."""
    return derive_seed(seed, 3, run_index)


@torch.no_grad()
def for_task(rule: UpdateRule, task: Task) -> UpdateRule:
    """Gives a rule that normalises per tensor the task's tensor layout (others ignore it; a
    rule already bound to a layout keeps it)."""
    bind = getattr(rule, "for_tensors", None)
    if not callable(bind) or getattr(rule, "tensor_sizes", None) is not None:
        return rule
    return bind(task.tensor_sizes)


FINAL_LOSSES = ("own_batches", "held_out")


def run_once(
    task: Task,
    rule: UpdateRule,
    *,
    steps: int,
    seed: int,
    with_test_metrics: bool = False,
    checkpoints: int = 0,
    final_loss: str = "own_batches",
) -> RunResult:
    """Runs ``rule`` for ``steps`` steps on ``task`` from the init and batches of ``seed``; a
    per-tensor rule is bound to the task's tensor layout first (``for_task``). ``checkpoints``:
    also measure that many evenly spaced iterates and the last (``RunResult.checkpoint_losses``).

    ``final_loss`` says how w_T is measured: "own_batches", the paper's definition (the mean
    over the run's own T minibatches, what ``reproduce`` reports), or "held_out", on the
    held-out batches that measure the iterates (what the held-out benchmark reports).
    """
    if final_loss not in FINAL_LOSSES:
        raise ValueError(f"final_loss must be one of {FINAL_LOSSES}, got {final_loss!r}")
    rule = for_task(rule, task)
    w = task.init_params(generator(seed, 0))
    state = rule.init(w.numel())
    curve: list[float] = []
    measured: list[float] = []
    at = checkpoint_steps(steps, checkpoints)
    diverged = False
    for t in range(steps):
        if t in at:
            measured.append(held_out_loss(task, w, seed))
        loss, grad = task.loss_and_grad(w, task.sample_batch(batch_generator(seed, t)))
        curve.append(float(loss))
        if not math.isfinite(curve[-1]):  # no update from a non-finite loss's gradient
            diverged = True
            break
        delta, state = rule.update(grad, state)
        if not bool(torch.isfinite(delta).all()):
            diverged = True
            break
        w = w + delta
    if diverged:
        final = math.inf
    elif final_loss == "held_out":
        final = held_out_loss(task, w, seed)
    else:
        final = sum(
            float(task.loss(w, task.sample_batch(batch_generator(seed, t)))) for t in range(steps)
        ) / max(steps, 1)
    diverged = diverged or not math.isfinite(final)
    if checkpoints and not diverged:
        measured.append(final if final_loss == "held_out" else held_out_loss(task, w, seed))
    metrics = task.test_metrics(w) if with_test_metrics and not diverged else {}
    return RunResult(curve, final, diverged, metrics, tuple(measured))


def evaluate(
    task: Task,
    rule: UpdateRule,
    *,
    task_name: str,
    steps: int,
    runs: int,
    seed: int = 0,
    lr: float | None = None,
    with_test_metrics: bool = False,
    on_run: Callable[[RunResult], None] | None = None,
    checkpoints: int = 0,
) -> EvaluationResult:
    """Evaluates ``rule`` over ``runs`` seeded runs (the same runs for every optimizer).

    ``on_run`` sees each run's ``RunResult`` (its whole curve and, with ``checkpoints``, its
    measured iterates), for a caller that judges runs one by one (``hyperadam reproduce``
    counts the unstable ones).
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    results = [
        run_once(
            task,
            rule,
            steps=steps,
            seed=run_seed(seed, r),
            with_test_metrics=with_test_metrics,
            checkpoints=checkpoints,
        )
        for r in range(runs)
    ]
    if on_run is not None:
        for result in results:
            on_run(result)
    curve_mean = [_mean([r.curve[t] for r in results if t < len(r.curve)]) for t in range(steps)]
    test_metrics: dict[str, list[float]] = {}
    for r in results:
        for name, value in r.test_metrics.items():
            test_metrics.setdefault(name, []).append(value)
    return EvaluationResult(
        task=task_name,
        optimizer=rule.name,
        runs=runs,
        steps=steps,
        seed=seed,
        lr=lr,
        final_losses=[r.final_loss for r in results],
        curve_mean=curve_mean,
        test_metrics=test_metrics,
        diverged_runs=sum(r.diverged for r in results),
    )
