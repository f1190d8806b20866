"""Interfaces of optimizee tasks and task families (no maths here).

A ``Task`` is a functional optimizee: a loss over ONE flat parameter vector and a minibatch, so
any update rule can drive it. A ``TaskFamily`` separates *sampling* a configuration (a frozen,
hashable, serialisable ``TaskConfig``) from *building* the task, so that a task can be rebuilt
exactly from its logged config (learned_optimization's Task/TaskFamily cut).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor

from .. import config as config_lib

Batch = tuple[Tensor, ...]


class Task(abc.ABC):
    """An optimizee: initial parameters, a minibatch sampler and a loss, all over a flat vector."""

    name: str

    @property
    @abc.abstractmethod
    def num_params(self) -> int:
        """Length p of the flat parameter vector."""

    @abc.abstractmethod
    def init_params(self, generator: torch.Generator) -> Tensor:
        """Draws the initial flat parameters w_0 ([p] float32)."""

    @abc.abstractmethod
    def sample_batch(self, generator: torch.Generator) -> Batch:
        """Draws one training minibatch (data, targets and any per-batch randomness)."""

    @abc.abstractmethod
    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        """Scalar training loss of ``params`` on ``batch`` (differentiable in ``params``)."""

    def loss_and_grad(self, params: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Returns the detached loss and its gradient w.r.t. ``params`` (one forward+backward)."""
        with torch.enable_grad():
            w = params.detach().requires_grad_(True)
            loss = self.loss(w, batch)
            (grad,) = torch.autograd.grad(loss, w)
        return loss.detach(), grad

    @property
    def tensor_sizes(self) -> tuple[int, ...]:
        """Sizes of the model's tensors, in flat order (one tensor unless a task says more).

        Per-tensor learned optimizers normalise within each of these pieces.
        """
        return (self.num_params,)

    def test_metrics(self, params: Tensor) -> dict[str, float]:
        """Held-out metrics of ``params`` (test loss, top-1/top-2 accuracy); empty if none."""
        del params
        return {}


class TaskConfig(abc.ABC):
    """A frozen, hashable description of one task; subclasses are frozen dataclasses."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data that rebuilds this config."""


class TaskFamily(abc.ABC):
    """A distribution over tasks: seeded sampling of configs, then building tasks from them."""

    @abc.abstractmethod
    def sample(self, seed: int) -> TaskConfig:
        """Draws a task configuration; the same seed always gives the same config."""

    @abc.abstractmethod
    def build(self, config: TaskConfig) -> Task:
        """Builds the task a config describes."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The family's own configuration, for logging and its lineage digest."""

    def digest(self) -> str:
        """sha256 of the canonical JSON of ``to_dict()``: the task-distribution digest that
        θ's lineage (``task_digest``) and a run's ``family_digest`` param record."""
        return config_lib.digest(self.to_dict())
