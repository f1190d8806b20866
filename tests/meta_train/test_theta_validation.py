"""Validation of θ during meta-training: one task as the paper, or the mean over several."""

import numpy as np
import pytest
import torch

from meta_train.evaluate import evaluate
from meta_train.optimizers.hyperadam import HyperAdam
from meta_train.run_config import ValidationConfig
from meta_train.seeding import generator
from meta_train.tasks.suite import build_test_task
from meta_train.validation import Validator

TASKS = ("mnist-nn-sigmoid-100", "mnist-nn-relu-100")


@pytest.fixture(scope="module")
def theta():
    optimizer = HyperAdam()
    return optimizer, optimizer.flatten(optimizer.init_theta(generator(5))).numpy()


def _alone(optimizer, theta_flat, task):
    rule = optimizer.bind(optimizer.unflatten(torch.tensor(theta_flat)))
    return evaluate(build_test_task(task), rule, task_name=task, steps=4, runs=2, seed=1)


def test_several_tasks_score_the_mean_of_their_means(theta):
    optimizer, theta_flat = theta
    config = ValidationConfig(task=TASKS, runs=2, steps=4, seed=1)
    result = Validator(config, optimizer)(step=7, theta=theta_flat)
    alone = [_alone(optimizer, theta_flat, task) for task in TASKS]
    assert result.step == 7 and result.diverged_runs == 0
    assert result.score == pytest.approx(np.mean([a.final_loss_mean for a in alone]), rel=1e-6)
    pooled = [loss for a in alone for loss in a.final_losses]
    assert result.final_loss_std == pytest.approx(np.std(pooled), rel=1e-6)


def test_one_task_scores_as_before(theta):
    optimizer, theta_flat = theta
    config = ValidationConfig(task=TASKS[0], runs=2, steps=4, seed=1)
    result = Validator(config, optimizer)(step=1, theta=theta_flat)
    alone = _alone(optimizer, theta_flat, TASKS[0])
    assert result.score == pytest.approx(alone.final_loss_mean, rel=1e-7)
    assert result.final_loss_std == pytest.approx(alone.final_loss_std, rel=1e-6)
    assert not [key for key in result.metrics() if key.startswith("validation/task/")]


def test_adam_ratio_scores_each_task_against_adam_on_the_same_runs(theta, monkeypatch):
    from meta_train.optimizers import make_baseline
    from meta_train.tasks.suite import TEST_TASKS

    optimizer, theta_flat = theta
    tasks = ("mnist-nn-relu-100", "sin-lstm")  # cross-entropy beside squared error
    config = ValidationConfig(task=tasks, runs=2, steps=4, seed=1)
    validator = Validator(config, optimizer, score="adam_ratio")
    result = validator(step=3, theta=theta_flat)
    ratios = []
    for task in tasks:
        adam = make_baseline("adam", TEST_TASKS[task].adam_lr)
        reference = evaluate(build_test_task(task), adam, task_name=task, steps=4, runs=2, seed=1)
        ratios.append(_alone(optimizer, theta_flat, task).final_loss_mean
                      / reference.final_loss_mean)
    assert result.score == pytest.approx(np.mean(ratios), rel=1e-6)
    # Each task's score is logged beside the mean (a trade between tasks shows there).
    logged = result.metrics()
    for task, ratio in zip(tasks, ratios, strict=True):
        assert logged[f"validation/task/{task}"] == pytest.approx(ratio, rel=1e-6)
    # Adam's reference runs once per validator: later validations evaluate θ alone.
    evaluated = []
    real = validator._evaluate
    monkeypatch.setattr(
        validator, "_evaluate", lambda name, rule: evaluated.append(name) or real(name, rule)
    )
    again = validator(step=4, theta=theta_flat)
    assert again.score == result.score and evaluated == list(tasks)


def test_an_unknown_validation_score_is_refused(theta):
    message = r"score must be one of \('loss', 'adam_ratio'\), got 'accuracy'"
    with pytest.raises(ValueError, match=message):
        Validator(ValidationConfig(), theta[0], score="accuracy")


def test_the_score_is_logged_as_a_score_not_as_a_final_loss(theta):
    optimizer, theta_flat = theta
    config = ValidationConfig(task=TASKS[0], runs=1, steps=2, seed=1)
    metrics = Validator(config, optimizer)(step=1, theta=theta_flat).metrics()
    assert "validation/score" in metrics and "validation/final_loss" not in metrics
