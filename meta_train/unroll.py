"""Truncated unrolls of a learned optimizer on a task and their first-order meta-gradient (spec §3).

A trajectory of T inner steps is split into truncations of n steps (T = 100, n = 20 in the
paper). Each truncation starts from the trajectory's current parameters and optimizer state
(detached), runs n steps of the learned optimizer, and backpropagates a meta-loss to θ. The
optimizee gradients are treated as constants (first order, spec §3: "second order dropped").

Why one optimizee forward per step suffices: with g_k held constant, the meta-loss
(1/n) Σ_k L(w_k) has ∂/∂w_k = g_k — exactly the gradient already computed to drive the optimizer.
So the meta-gradient is the gradient of the surrogate (1/n) Σ_k ⟨g_k, w_k(θ)⟩, which backpropagates
only through the optimizer steps, never through the optimizee network again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .optimizers.base import LearnedUpdateRule
from .seeding import generator
from .tasks.base import Task

# "mean" of the n iterates' losses (the paper), the "last" one (RNNprop), or the mean of their
# logarithms, "log": log L is comparable across tasks whose losses differ in scale (its
# gradient g/L weighs every task by its relative progress), so no task dominates the average.
META_LOSSES = ("mean", "last", "log")
LOG_FLOOR = 1e-12  # the "log" meta-loss clamps L here (a task at zero loss has nothing to learn)


@dataclasses.dataclass(frozen=True)
class UnrollConfig:
    """How one trajectory is unrolled and scored (spec §3 table, §7 for the baselines)."""

    horizon: int = 100  # T: inner steps per trajectory
    truncation: int = 20  # n: inner steps per meta-gradient
    meta_loss: str = "mean"  # "mean" over the n iterates (HyperAdam, DM) or "last" (RNNprop)
    lr: float | None = None  # inner step size α; None = the optimizer's default

    def __post_init__(self) -> None:
        if self.truncation < 1:
            raise ValueError(f"truncation must be >= 1, got {self.truncation}")
        if self.horizon < self.truncation or self.horizon % self.truncation:
            raise ValueError(
                f"horizon must be a positive multiple of truncation ({self.truncation}), "
                f"got {self.horizon}"
            )
        if self.meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {self.meta_loss!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def truncations_per_trajectory(self) -> int:
        return self.horizon // self.truncation


class Trajectory(NamedTuple):
    """The inner problem carried across truncations (all tensors detached)."""

    seed: int  # the task seed; minibatch t is drawn from generator(seed, t)
    step: int  # inner steps taken so far
    params: Tensor  # [p] float32 optimizee parameters w_step
    opt_state: Any  # the learned optimizer's state NamedTuple


class UnrollResult(NamedTuple):
    meta_grad: Tensor  # flat, same layout as θ
    trajectory: Trajectory  # where the next truncation continues
    meta_loss: float  # the meta-objective's value (mean or last inner loss)
    inner_losses: list[float]  # L(w_k; batch_k) for the n steps of this truncation


def batch_generator(task_seed: int, step: int) -> torch.Generator:
    """The generator of minibatch ``step`` of a trajectory: identical for every optimizer."""
    return generator(task_seed, 1, step)


def start_trajectory(optimizer: LearnedUpdateRule, task: Task, seed: int) -> Trajectory:
    """Draws w_0 for the task (from ``seed``) and the optimizer's zero state."""
    params = task.init_params(generator(seed, 0))
    if getattr(optimizer, "per_tensor", False):  # normalises within each of the task's tensors
        per_tensor: Any = optimizer  # its init_state also takes the tensors' sizes
        state = per_tensor.init_state(params.numel(), tensor_sizes=task.tensor_sizes)
    else:
        state = optimizer.init_state(params.numel())
    return Trajectory(seed, 0, params, state)


def unroll_truncation(
    optimizer: LearnedUpdateRule,
    theta_flat: Tensor,
    task: Task,
    trajectory: Trajectory,
    config: UnrollConfig,
) -> UnrollResult:
    """Runs one truncation and returns the first-order meta-gradient of its meta-loss.

    Args:
      optimizer: the learned optimizer (its ``step`` must be differentiable in θ).
      theta_flat: θ as one flat vector (``optimizer.flatten``); not modified.
      task: the optimizee (usually a ``MixedTask`` with the training tricks).
      trajectory: where the trajectory stands; ``start_trajectory`` for a new one.
      config: truncation length, meta-loss and step size.

    Returns:
      The meta-gradient (flat, like θ), the advanced trajectory (detached), the meta-loss value
      and the inner losses of the truncation.
    """
    lr = optimizer.default_lr if config.lr is None else config.lr
    theta_leaf = theta_flat.detach().requires_grad_(True)
    theta = optimizer.unflatten(theta_leaf)
    w, state = trajectory.params, trajectory.opt_state
    surrogate = torch.zeros(())
    losses: list[Tensor] = []
    with torch.enable_grad():
        for k in range(config.truncation):
            step = trajectory.step + k
            loss, grad = task.loss_and_grad(
                w.detach(), task.sample_batch(batch_generator(trajectory.seed, step))
            )
            losses.append(loss)
            if config.meta_loss == "mean":
                surrogate = surrogate + torch.dot(grad, w)
            elif config.meta_loss == "log":  # ∂ log L / ∂w = g / L, L held constant
                surrogate = surrogate + torch.dot(grad, w) / loss.clamp_min(LOG_FLOOR)
            delta, state = optimizer.step(theta, grad, state, lr=lr)
            w = w + delta
        end = trajectory.step + config.truncation
        if config.meta_loss == "last":
            # Loss of the final iterate, on the batch the next step will use.
            last_loss, last_grad = task.loss_and_grad(
                w.detach(), task.sample_batch(batch_generator(trajectory.seed, end))
            )
            surrogate = torch.dot(last_grad, w)
            meta_loss = float(last_loss)
        elif config.meta_loss == "log":
            surrogate = surrogate / config.truncation
            meta_loss = float(torch.stack(losses).clamp_min(LOG_FLOOR).log().mean())
        else:
            surrogate = surrogate / config.truncation
            meta_loss = float(torch.stack(losses).mean())
        if surrogate.requires_grad:
            (meta_grad,) = torch.autograd.grad(surrogate, theta_leaf)
        else:
            meta_grad = torch.zeros_like(theta_leaf)
    detached_state = type(state)(*(s.detach() for s in state))
    return UnrollResult(
        meta_grad=meta_grad,
        trajectory=Trajectory(trajectory.seed, end, w.detach(), detached_state),
        meta_loss=meta_loss,
        inner_losses=[float(x) for x in losses],
    )
