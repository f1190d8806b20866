"""Persistent evolution strategies (PES): a forward-only meta-gradient estimator (issue 15).

Truncated backpropagation (``unroll.unroll_truncation``) differentiates each truncation alone,
so it is biased toward short horizons: what θ does in truncation k to truncation k+1's loss is
never credited. PES (Vicol, Metz, Sohl-Dickstein, ICML 2021) removes that bias. Each slot
carries an *antithetic pair* of inner trajectories, one run with θ + ε_k and one with θ − ε_k
in every truncation k (fresh Gaussian ε_k ~ N(0, σ²I) per truncation), and the sum ξ = Σ_k ε_k
of every perturbation the pair has seen since its trajectory started. The estimate of the
truncation's contribution to the full-horizon loss gradient is

    ĝ_k = ξ · (L⁺_k − L⁻_k) / (2σ²),

and Σ_k ĝ_k is unbiased for the gradient of the Gaussian-smoothed whole-trajectory loss. No
backward pass runs, so any step (the fused kernel included) works, and a worker returns only
that vector. Every ε derives from (run seed, slot, step, pair), so redone work is bit-identical:
a slot's ``PESState`` (its pairs of trajectories and their ξ) is rebuilt exactly by replaying its
truncations with the θ versions they used, like a TBPTT trajectory (``worker.rebuild_trajectory``).
``pes_slot`` is the work of one slot at one meta-step (``training.slot_work`` calls it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor

from .optimizers.base import LearnedUpdateRule
from .seeding import derive_seed, generator
from .tasks.base import Task
from .unroll import (
    LOG_FLOOR,
    Trajectory,
    UnrollConfig,
    UnrollResult,
    batch_generator,
    start_trajectory,
)

NOISE_STREAM = 17  # ε of (run seed, slot, step) is drawn from derive_seed(run_seed, 17, slot, step)


@dataclasses.dataclass(frozen=True)
class PESConfig:
    """σ of the perturbations (in θ's units)."""

    sigma: float = 0.01

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")


class PESParticle(NamedTuple):
    """An antithetic pair of trajectories and the perturbation they have accumulated."""

    positive: Trajectory
    negative: Trajectory
    xi: Tensor  # Σ of the ε applied since the trajectories started (θ's flat shape)


class PESState(NamedTuple):
    """A slot's PES state: its antithetic pairs (all on the same task and minibatches)."""

    particles: tuple[PESParticle, ...]

    @property
    def seed(self) -> int:
        """The task seed of the slot's trajectory (as ``Trajectory.seed``)."""
        return self.particles[0].positive.seed

    @property
    def step(self) -> int:
        """Inner steps each of the trajectories has taken (as ``Trajectory.step``)."""
        return self.particles[0].positive.step


class PESResult(NamedTuple):
    meta_grad: Tensor
    particle: PESParticle
    meta_loss: float  # the mean of the pair's two truncation losses


def start_particle(
    optimizer: LearnedUpdateRule, task: Task, seed: int, num_theta: int
) -> PESParticle:
    """Both trajectories start where a TBPTT trajectory of ``seed`` would; ξ = 0."""
    trajectory = start_trajectory(optimizer, task, seed)
    return PESParticle(trajectory, trajectory, torch.zeros(num_theta))


def start_state(
    optimizer: LearnedUpdateRule, task: Task, seed: int, num_theta: int, pairs: int = 1
) -> PESState:
    """``pairs`` particles at the start of a trajectory of ``seed`` (all alike until perturbed)."""
    particle = start_particle(optimizer, task, seed, num_theta)
    return PESState((particle,) * pairs)


def perturbation(
    run_seed: int, slot: int, step: int, num_theta: int, sigma: float, pair: int = 0
) -> Tensor:
    """ε of one slot's pair at one meta-step: N(0, σ²) per θ coordinate, from the logged seeds."""
    entropy = (run_seed, NOISE_STREAM, slot, step) + ((pair,) if pair else ())
    g = generator(derive_seed(*entropy))
    return torch.randn(num_theta, generator=g) * sigma


@torch.no_grad()
def run_truncation(
    optimizer: LearnedUpdateRule,
    theta_flat: Tensor,
    task: Task,
    trajectory: Trajectory,
    config: UnrollConfig,
) -> tuple[float, Trajectory]:
    """Forward only: n steps from ``trajectory``; returns the truncation's meta-loss."""
    value, _, advanced = _forward_truncation(optimizer, theta_flat, task, trajectory, config)
    return value, advanced


def _forward_truncation(
    optimizer: LearnedUpdateRule,
    theta_flat: Tensor,
    task: Task,
    trajectory: Trajectory,
    config: UnrollConfig,
) -> tuple[float, list[float], Trajectory]:
    """``run_truncation``, also returning the inner losses of its n steps."""
    lr = optimizer.default_lr if config.lr is None else config.lr
    theta = optimizer.unflatten(theta_flat)
    w, state = trajectory.params, trajectory.opt_state
    losses = []
    for k in range(config.truncation):
        batch = task.sample_batch(batch_generator(trajectory.seed, trajectory.step + k))
        loss, grad = task.loss_and_grad(w, batch)
        losses.append(float(loss))
        delta, state = optimizer.step(theta, grad, state, lr=lr)
        w = w + delta
    end = trajectory.step + config.truncation
    if config.meta_loss == "last":
        batch = task.sample_batch(batch_generator(trajectory.seed, end))
        value = float(task.loss(w, batch))
    elif config.meta_loss == "log":
        value = sum(math.log(max(x, LOG_FLOOR)) for x in losses) / len(losses)
    else:
        value = sum(losses) / len(losses)
    return value, losses, Trajectory(trajectory.seed, end, w, state)


def pes_truncation(
    optimizer: LearnedUpdateRule,
    theta_flat: Tensor,
    task: Task,
    particle: PESParticle,
    config: UnrollConfig,
    epsilon: Tensor,
    sigma: float,
) -> PESResult:
    """One PES truncation of an antithetic pair with perturbation ``epsilon`` ~ N(0, σ²I)."""
    result, _ = _pes_truncation(optimizer, theta_flat, task, particle, config, epsilon, sigma)
    return result


def _pes_truncation(
    optimizer: LearnedUpdateRule,
    theta_flat: Tensor,
    task: Task,
    particle: PESParticle,
    config: UnrollConfig,
    epsilon: Tensor,
    sigma: float,
) -> tuple[PESResult, list[float]]:
    """``pes_truncation``, also returning the inner losses (the mean of the pair's, per step)."""
    positive_loss, positive_losses, positive = _forward_truncation(
        optimizer, theta_flat + epsilon, task, particle.positive, config
    )
    negative_loss, negative_losses, negative = _forward_truncation(
        optimizer, theta_flat - epsilon, task, particle.negative, config
    )
    inner = [0.5 * (a + b) for a, b in zip(positive_losses, negative_losses, strict=True)]
    xi = particle.xi + epsilon
    difference = positive_loss - negative_loss
    if not math.isfinite(difference):
        grad = torch.full_like(xi, math.nan)  # rejected and counted by the meta-update
    else:
        grad = xi * (difference / (2.0 * sigma * sigma))
    return PESResult(
        grad, PESParticle(positive, negative, xi), 0.5 * (positive_loss + negative_loss)
    ), inner


def pes_slot(
    optimizer: LearnedUpdateRule,
    theta_flat: Tensor,
    task: Task,
    state: PESState,
    config: UnrollConfig,
    *,
    sigma: float,
    run_seed: int,
    slot: int,
    step: int,
) -> UnrollResult:
    """One slot's PES truncation at meta-step ``step``: every pair, each with its own ε.

    Returns what ``unroll.unroll_truncation`` does: the estimate averaged over the pairs (in
    pair order), the advanced ``PESState`` in place of the trajectory, the pairs' mean meta-loss
    and the inner losses averaged over the 2·pairs trajectories, step by step.
    """
    grads, losses, inner_sums = [], [], [0.0] * config.truncation
    particles = []
    for pair, particle in enumerate(state.particles):
        epsilon = perturbation(run_seed, slot, step, theta_flat.numel(), sigma, pair)
        result, inner = _pes_truncation(
            optimizer, theta_flat, task, particle, config, epsilon.to(theta_flat), sigma
        )
        grads.append(result.meta_grad)
        losses.append(result.meta_loss)
        particles.append(result.particle)
        inner_sums = [total + x for total, x in zip(inner_sums, inner, strict=True)]
    count = len(state.particles)
    meta_grad = grads[0] if count == 1 else torch.stack(grads).mean(0)
    return UnrollResult(
        meta_grad=meta_grad,
        trajectory=PESState(tuple(particles)),  # type: ignore[arg-type]  # the slot's state
        meta_loss=sum(losses) / count,
        inner_losses=[total / count for total in inner_sums],
    )

