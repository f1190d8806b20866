"""PES: on a tiny quadratic, the mean of many estimates is the full-horizon loss's gradient."""

from __future__ import annotations

import math

import pytest
import torch

from meta_train.optimizers.hyperadam import HyperAdam
from meta_train.pes import PESConfig, perturbation, pes_truncation, run_truncation, start_particle
from meta_train.tasks.quadratic import QuadraticTask
from meta_train.unroll import UnrollConfig, start_trajectory

HORIZON, TRUNCATION = 12, 4


def _setup():
    optimizer = HyperAdam(2)  # 70 meta-parameters
    task = QuadraticTask(dim=6, rows=32, batch_size=8, seed=3, dtype=torch.float64)
    theta = optimizer.flatten(optimizer.init_theta(torch.Generator().manual_seed(0)))
    theta = theta.double() * 3.0  # cells that matter
    return optimizer, task, theta, UnrollConfig(HORIZON, TRUNCATION, "mean", lr=0.05)


def _full_horizon_loss(optimizer, task, theta, config, seed):
    trajectory = start_trajectory(optimizer, task, seed)
    total = 0.0
    for _ in range(HORIZON // TRUNCATION):
        value, trajectory = run_truncation(optimizer, theta, task, trajectory, config)
        total += value
    return total / (HORIZON // TRUNCATION)


@pytest.mark.slow  # many antithetic pairs in float64 (≈ 30 s)
def test_the_mean_estimate_matches_a_finite_difference_gradient(float64):
    optimizer, task, theta, config = _setup()
    sigma, trials, seed = 1e-3, 3000, 5
    direction = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(9))
    direction /= direction.norm()
    h = 1e-4
    exact = (
        _full_horizon_loss(optimizer, task, theta + h * direction, config, seed)
        - _full_horizon_loss(optimizer, task, theta - h * direction, config, seed)
    ) / (2 * h)
    projections = []
    for trial in range(trials):
        particle = start_particle(optimizer, task, seed, theta.numel())
        total = torch.zeros_like(theta)
        for k in range(HORIZON // TRUNCATION):
            eps = perturbation(trial, 0, k, theta.numel(), sigma).double()
            result = pes_truncation(optimizer, theta, task, particle, config, eps, sigma)
            particle = result.particle
            total += result.meta_grad
        projections.append(float(total @ direction) / (HORIZON // TRUNCATION))
    values = torch.tensor(projections)
    mean, stderr = float(values.mean()), float(values.std() / math.sqrt(trials))
    assert abs(exact) > 3 * stderr  # the check below is not vacuous
    assert abs(mean - exact) < 3 * stderr, (mean, exact, stderr)


def test_estimates_are_deterministic_and_the_pair_is_antithetic():
    optimizer, task, theta, config = _setup()
    theta = theta.float()
    task = QuadraticTask(dim=6, rows=32, batch_size=8, seed=3)
    particle = start_particle(optimizer, task, 1, theta.numel())
    eps = perturbation(0, 2, 7, theta.numel(), 0.01)
    assert torch.equal(eps, perturbation(0, 2, 7, theta.numel(), 0.01))
    assert not torch.equal(eps, perturbation(0, 2, 8, theta.numel(), 0.01))
    a = pes_truncation(optimizer, theta, task, particle, config, eps, 0.01)
    b = pes_truncation(optimizer, theta, task, particle, config, eps, 0.01)
    assert torch.equal(a.meta_grad, b.meta_grad)
    assert torch.equal(a.particle.xi, eps)
    assert not torch.equal(a.particle.positive.params, a.particle.negative.params)
    # With ε = 0 both trajectories are the TBPTT one and the estimate is zero.
    zero = pes_truncation(optimizer, theta, task, particle, config, torch.zeros_like(eps), 0.01)
    assert torch.equal(zero.particle.positive.params, zero.particle.negative.params)
    assert float(zero.meta_grad.abs().max()) == 0.0


def test_sigma_is_validated():
    with pytest.raises(ValueError, match="sigma"):
        PESConfig(sigma=0.0)
