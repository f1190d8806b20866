"""Periodic validation of θ during meta-training (spec §3: 10 runs on mnist-nn-sigmoid-100).

The learned optimizer with the current θ runs the paper's evaluation protocol
(``evaluate.evaluate``: the same seeded inits and minibatches every time) and is scored by the
mean final loss (over several validation tasks: the mean of their means), or, as an experiment,
by that loss over Adam's on the same runs (``experimental.validation_score = "adam_ratio"``).
The score is logged as ``validation/score``: a ratio is not a loss. Runs recorded before that
logged it as ``validation/final_loss`` (``VALIDATION_SCORE_BEFORE``). Test tasks are built, and
Adam's reference losses computed, once per process, on first use.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluate import evaluate
from .experimental import VALIDATION_SCORES
from .run_config import ValidationConfig

VALIDATION_SCORE = "validation/score"  # the mean final loss, or the mean ratio to Adam's
VALIDATION_LOSS_STD = "validation/final_loss_std"  # std of the runs' final losses (never a ratio)
VALIDATION_DIVERGED = "validation/diverged_runs"
VALIDATION_BEST = "validation/best_score"
# The names runs logged these under before the score could be a ratio; read when old runs are.
VALIDATION_SCORE_BEFORE = "validation/final_loss"
VALIDATION_BEST_BEFORE = "validation/best_final_loss"
VALIDATION_SECONDS = "time/validation_s"
VALIDATION_TASK_PREFIX = "validation/task/"  # + task key: that task's score (several tasks only)


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    step: int  # θ version validated (meta-updates applied)
    score: float  # mean over tasks of the mean final loss or its ratio to Adam's (inf: diverged)
    final_loss_std: float
    diverged_runs: int
    seconds: float
    task_scores: tuple[tuple[str, float], ...] = ()  # (task, score) when there are several

    def metrics(self) -> dict[str, float]:
        return {
            VALIDATION_SCORE: self.score,
            VALIDATION_LOSS_STD: self.final_loss_std,
            VALIDATION_DIVERGED: float(self.diverged_runs),
            VALIDATION_SECONDS: self.seconds,
            **{VALIDATION_TASK_PREFIX + task: score for task, score in self.task_scores},
        }


class Validator:
    """Scores θ on the validation task.

    Args:
      config: which task, how many runs and steps, which evaluation seed.
      optimizer: the learned optimizer θ belongs to.
      lr: the inner step size (None: the optimizer's default α).
      data_dir: dataset folder (None: the packaged MNIST).
      score: ``"loss"`` (the paper's) or ``"adam_ratio"`` (``experimental.validation_score``).
    """

    def __init__(
        self,
        config: ValidationConfig,
        optimizer: Any,
        *,
        lr: float | None = None,
        data_dir: str | Path | None = None,
        score: str = "loss",
    ) -> None:
        if score not in VALIDATION_SCORES:
            raise ValueError(f"score must be one of {VALIDATION_SCORES}, got {score!r}")
        self.config = config
        self.score = score
        self.optimizer = optimizer
        self.lr = lr
        self.data_dir = data_dir
        self._tasks: dict[str, Any] = {}
        self._adam_loss: dict[str, float] = {}

    def due(self, step: int, final_step: int) -> bool:
        """Validate every ``every`` steps and at the end (never when ``every`` is 0)."""
        every = self.config.every
        return every > 0 and step > 0 and (step % every == 0 or step == final_step)

    def __call__(self, step: int, theta: np.ndarray) -> ValidationResult:
        start = time.perf_counter()
        theta_named = self.optimizer.unflatten(torch.tensor(np.asarray(theta, np.float32)))
        rule = self.optimizer.bind(theta_named, lr=self.lr)
        means, losses, diverged = [], [], 0
        for name in self.config.tasks:
            result = self._evaluate(name, rule)
            score = result.final_loss_mean
            if self.score == "adam_ratio":
                score /= self._adam_reference(name)
            means.append(score)
            losses.extend(result.final_losses)
            diverged += result.diverged_runs
        loss = float(np.mean(means))
        return ValidationResult(
            step=step,
            score=loss if math.isfinite(loss) else math.inf,
            final_loss_std=float(np.std(losses)) if all(map(math.isfinite, losses)) else math.inf,
            diverged_runs=diverged,
            seconds=time.perf_counter() - start,
            task_scores=(
                tuple(zip(self.config.tasks, means, strict=True)) if len(means) > 1 else ()
            ),
        )

    def _evaluate(self, name: str, rule: Any) -> Any:
        from .tasks.suite import TEST_TASKS, build_test_task

        if name not in self._tasks:
            self._tasks[name] = build_test_task(name, data_dir=self.data_dir)
        return evaluate(
            self._tasks[name],
            rule,
            task_name=name,
            steps=self.config.steps or TEST_TASKS[name].horizon,
            runs=self.config.runs,
            seed=self.config.seed,
        )

    def _adam_reference(self, name: str) -> float:
        """Adam's mean final loss on the task's validation runs (its tuned lr, spec §5)."""
        if name not in self._adam_loss:
            from .optimizers import make_baseline
            from .tasks.suite import TEST_TASKS

            loss = self._evaluate(name, make_baseline("adam", TEST_TASKS[name].adam_lr))
            if not (math.isfinite(loss.final_loss_mean) and loss.final_loss_mean > 0):
                raise RuntimeError(
                    f"validation: Adam's reference loss on {name} is "
                    f"{loss.final_loss_mean}; an adam_ratio score needs a finite positive one"
                )
            self._adam_loss[name] = loss.final_loss_mean
        return self._adam_loss[name]
