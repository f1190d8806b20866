"""The held-out suite's tasks: well-formed, seeded, finite, and truly outside the families."""

from __future__ import annotations

import math

import pytest
import torch

from meta_train.seeding import generator
from meta_train.tasks.heldout import (
    HELDOUT_SUITE,
    LeastSquaresTask,
    LogisticRegressionTask,
    heldout_spec,
)


def test_the_suite_spans_what_the_issue_asks():
    assert len(HELDOUT_SUITE) >= 12
    horizons = [s.horizon for s in HELDOUT_SUITE]
    assert {100, 1000} <= set(horizons) and sum(h == 10000 for h in horizons) >= 3
    keys = " ".join(s.key for s in HELDOUT_SUITE)
    for needle in ("ln", "bn", "gelu", "silu", "rescnn", "lstm", "gru", "transformer",
                   "autoencoder", "leastsq", "logreg", "cnn1-mnist-2000", "cnn2-mnist-2000"):
        assert needle in keys, needle
    assert len(set(keys.split())) == len(HELDOUT_SUITE)


@pytest.mark.parametrize("key", [s.key for s in HELDOUT_SUITE])
def test_every_task_is_seeded_finite_and_differentiable(key):
    task = heldout_spec(key).build()
    assert sum(task.tensor_sizes) == task.num_params
    w0 = task.init_params(generator(3, 0))
    assert w0.shape == (task.num_params,) and w0.dtype == torch.float32
    assert torch.equal(w0, task.init_params(generator(3, 0)))  # the seed decides everything
    assert not torch.equal(w0, task.init_params(generator(4, 0)))
    batch = task.sample_batch(generator(3, 1, 0))
    loss, grad = task.loss_and_grad(w0, batch)
    assert math.isfinite(float(loss)) and bool(torch.isfinite(grad).all())
    assert float(grad.abs().max()) > 0


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match="known: mlp-ln"):
        heldout_spec("nope")


@pytest.mark.parametrize("cls", [LeastSquaresTask, LogisticRegressionTask])
def test_convex_tasks_report_the_excess_over_their_optimum(cls):
    task = cls("t", rows=300, cols=20, condition=1e5, seed=1)
    singular = torch.linalg.svdvals(task.features.double())
    assert float((singular[0] / singular[-1]) ** 2) == pytest.approx(1e5, rel=1e-3)
    batch = task.sample_batch(generator(0))
    # At random points the excess is positive; a long run of an exact solver reaches ~0.
    for seed in range(3):
        assert float(task.loss(task.init_params(generator(seed)), batch)) > 0
    w = torch.zeros(task.num_params, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")
    x, y = task.features.double(), task.targets.double()
    opt.step(lambda: (opt.zero_grad(), (l := task.objective(w, x, y)).backward(), l)[2])
    excess = float(task.objective(w.detach(), x, y)) - task.optimum
    assert -1e-9 < excess < 1e-3
