"""Interfaces shared by every optimizer: update rules, learned optimizers and flat θ layouts.

An *update rule* is the optax-style pair ``init(num_coords) -> state`` and
``update(grad, state) -> (delta, new_state)`` over ONE flat parameter vector; the caller applies
``w ← w + delta``. Hand-designed optimizers are update rules directly; a learned optimizer
becomes one once it is bound to its meta-parameters θ (``LearnedUpdateRule.bind``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

Theta = dict[str, Tensor]
"""Meta-parameters by name (e.g. ``"W_h"``); the order of ``theta_shapes`` is the flat order."""


class UpdateRule(Protocol):
    """A functional optimizer over one flat parameter vector."""

    name: str

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> NamedTuple:
        """Returns the zero state for ``num_coords`` coordinates."""
        ...

    def update(self, grad: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Returns ``(delta, new_state)``; the caller applies ``w ← w + delta``."""
        ...


class LearnedUpdateRule(abc.ABC):
    """A coordinate-wise learned optimizer in training form: pure functions of θ, gradient, state.

    A family of update rules indexed by the meta-parameters θ (``bind(θ)`` picks one). It is
    the differentiable torch side of a learned optimizer; its exported ONNX form, loaded by the
    runtime, is ``runtime.ExportedOptimizer``, and its user-facing PyTorch wrapper is
    ``runtime.torch.LearnedOptimizer``.

    Subclasses define the meta-parameter layout, their initialisation, the state layout and one
    differentiable step. ``step`` must be differentiable with respect to θ (and the incoming
    state) so that truncated unrolls can backpropagate through it.
    """

    name: str
    default_lr: float

    @abc.abstractmethod
    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every meta-parameter, in the canonical flat order."""

    @abc.abstractmethod
    def init_theta(self, generator: torch.Generator) -> Theta:
        """Draws the initial meta-parameters (the spec's initialisation)."""

    @abc.abstractmethod
    def init_state(self, num_coords: int, *, device: torch.device | str = "cpu") -> NamedTuple:
        """Returns the zero optimizer state for ``num_coords`` coordinates (fp32)."""

    @abc.abstractmethod
    def step(self, theta: Theta, grad: Tensor, state: Any, *, lr: float) -> tuple[Tensor, Any]:
        """One optimizer step: returns ``(delta, new_state)`` with ``w ← w + delta``."""

    # -- helpers shared by all learned optimizers -------------------------------------------

    def num_meta_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.theta_shapes().values())

    def flatten(self, theta: Mapping[str, Tensor]) -> Tensor:
        """Concatenates θ into one fp32 vector in the canonical order."""
        shapes = self.theta_shapes()
        missing = set(shapes) - set(theta)
        if missing:
            raise ValueError(f"theta for {self.name} lacks {sorted(missing)}")
        return torch.cat([theta[name].reshape(-1) for name in shapes])

    def unflatten(self, flat: Tensor) -> Theta:
        """Splits a flat vector into named views (differentiable; no copies)."""
        expected = self.num_meta_parameters()
        if flat.ndim != 1 or flat.numel() != expected:
            raise ValueError(
                f"flat theta for {self.name} must be a vector of {expected} values, "
                f"got shape {tuple(flat.shape)}"
            )
        theta, offset = {}, 0
        for name, shape in self.theta_shapes().items():
            size = math.prod(shape)
            theta[name] = flat[offset : offset + size].view(shape)
            offset += size
        return theta

    def bind(self, theta: Theta, *, lr: float | None = None) -> BoundLearnedUpdateRule:
        """Freezes θ (and the step size) into an update rule for evaluation."""
        return BoundLearnedUpdateRule(self, theta, self.default_lr if lr is None else lr)


class BoundLearnedUpdateRule:
    """A ``LearnedUpdateRule`` with fixed θ, usable wherever an ``UpdateRule`` is."""

    def __init__(
        self,
        optimizer: LearnedUpdateRule,
        theta: Theta,
        lr: float,
        tensor_sizes: tuple[int, ...] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.theta = {k: v.detach() for k, v in theta.items()}
        self.lr = lr
        self.name = optimizer.name
        self.tensor_sizes = tensor_sizes

    def for_tensors(self, tensor_sizes: tuple[int, ...]) -> BoundLearnedUpdateRule:
        """This rule over a vector packed from tensors of these sizes (per-tensor optimizers
        normalise within each; the others ignore the layout)."""
        return BoundLearnedUpdateRule(self.optimizer, self.theta, self.lr, tuple(tensor_sizes))

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> NamedTuple:
        if self.tensor_sizes is not None and getattr(self.optimizer, "per_tensor", False):
            per_tensor: Any = self.optimizer  # its init_state also takes the tensors' sizes
            return per_tensor.init_state(
                num_coords, device=device, tensor_sizes=self.tensor_sizes
            )
        return self.optimizer.init_state(num_coords, device=device)

    def update(self, grad: Tensor, state: Any) -> tuple[Tensor, Any]:
        with torch.no_grad():
            return self.optimizer.step(self.theta, grad, state, lr=self.lr)
