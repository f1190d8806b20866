"""Truncated unrolls: the first-order meta-gradient, trajectory carry-over, configuration."""

import pytest
import torch

from meta_train.optimizers.hyperadam import HyperAdam
from meta_train.seeding import generator
from meta_train.tasks.quadratic import QuadraticTask
from meta_train.unroll import (
    UnrollConfig,
    batch_generator,
    start_trajectory,
    unroll_truncation,
)


def replayed_meta_loss(opt, theta_flat, task, trajectory, grads, n):
    """The mean window loss with the optimizee gradients held at ``grads`` (first order)."""
    theta = opt.unflatten(theta_flat)
    w, state, losses = trajectory.params, trajectory.opt_state, []
    for k in range(n):
        batch = task.sample_batch(batch_generator(trajectory.seed, trajectory.step + k))
        losses.append(task.loss(w, batch))
        delta, state = opt.step(theta, grads[k], state, lr=0.05)
        w = w + delta
    return torch.stack(losses).mean()


def test_meta_gradient_reaches_every_meta_parameter_and_matches_finite_differences(float64):
    opt = HyperAdam(num_candidates=4)
    task = QuadraticTask(dim=6, rows=32, batch_size=8, seed=3, dtype=torch.float64)
    theta_flat = opt.flatten(opt.init_theta(generator(1)))
    # Start mid-trajectory so every state tensor is non-zero.
    trajectory = start_trajectory(opt, task, seed=5)
    config = UnrollConfig(horizon=40, truncation=20, lr=0.05)
    trajectory = unroll_truncation(opt, theta_flat, task, trajectory, config).trajectory
    result = unroll_truncation(opt, theta_flat, task, trajectory, config)

    for name, block in opt.unflatten(result.meta_grad).items():
        assert block.abs().max() > 0, f"meta-gradient does not reach {name}"
    assert (result.meta_grad != 0).float().mean() > 0.95

    grads = []
    w, state = trajectory.params, trajectory.opt_state
    theta = opt.unflatten(theta_flat)
    for k in range(20):
        batch = task.sample_batch(batch_generator(trajectory.seed, trajectory.step + k))
        _, grad = task.loss_and_grad(w, batch)
        grads.append(grad)
        delta, state = opt.step(theta, grad, state, lr=0.05)
        w = w + delta
    torch.testing.assert_close(w, result.trajectory.params)

    eps = 1e-6
    g = generator(8)
    for _ in range(4):
        direction = torch.randn(theta_flat.shape, generator=g)
        plus = replayed_meta_loss(opt, theta_flat + eps * direction, task, trajectory, grads, 20)
        minus = replayed_meta_loss(opt, theta_flat - eps * direction, task, trajectory, grads, 20)
        finite_difference = (plus - minus) / (2 * eps)
        analytic = torch.dot(result.meta_grad, direction)
        torch.testing.assert_close(analytic, finite_difference, rtol=1e-5, atol=1e-10)
    assert result.meta_loss == pytest.approx(float(torch.tensor(result.inner_losses).mean()))


def test_trajectory_carries_over_and_replays_identically():
    opt = HyperAdam()
    task = QuadraticTask(dim=20, seed=0)
    theta_flat = opt.flatten(opt.init_theta(generator(0)))
    config = UnrollConfig(horizon=40, truncation=20)
    start = start_trajectory(opt, task, seed=11)
    first = unroll_truncation(opt, theta_flat, task, start, config)
    assert first.trajectory.step == 20 and len(first.inner_losses) == 20
    second = unroll_truncation(opt, theta_flat, task, first.trajectory, config)
    again = unroll_truncation(opt, theta_flat, task, first.trajectory, config)
    assert torch.equal(second.meta_grad, again.meta_grad)
    assert second.trajectory.step == 40
    assert not first.trajectory.params.requires_grad


def test_last_step_meta_loss_is_the_loss_after_the_truncation():
    opt = HyperAdam()
    task = QuadraticTask(dim=20, seed=0)
    theta_flat = opt.flatten(opt.init_theta(generator(0)))
    config = UnrollConfig(horizon=20, truncation=20, meta_loss="last")
    result = unroll_truncation(opt, theta_flat, task, start_trajectory(opt, task, 1), config)
    batch = task.sample_batch(batch_generator(1, 20))
    assert result.meta_loss == pytest.approx(float(task.loss(result.trajectory.params, batch)))
    assert result.meta_grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"truncation": 0}, "truncation must be >= 1, got 0"),
        ({"horizon": 30}, r"horizon must be a positive multiple of truncation \(20\), got 30"),
        ({"meta_loss": "max"}, "meta_loss must be one of"),
        ({"lr": -1.0}, "lr must be > 0, got -1.0"),
    ],
)
def test_unroll_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UnrollConfig(**kwargs)
