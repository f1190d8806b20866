"""Hand-designed update rules with TF 1.x semantics, the baselines of the evaluation (spec §4).

Each rule is a frozen dataclass of validated hyperparameters implementing ``UpdateRule``:
``init(num_coords)`` returns a typed zero state and ``update(grad, state)`` returns
``(delta, new_state)`` with ``w ← w + delta``, without mutating anything. The maths follows
the TF 1.x optimizers the paper's baselines ran on (``tf.train.*Optimizer`` and their
``Apply*`` kernels), which differ from ``torch.optim`` in places noted per class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

# -- validation --------------------------------------------------------------------------------


def _check_lr(lr: float) -> None:
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def _check_decay(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_nonnegative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_num_coords(num_coords: int) -> None:
    if num_coords < 1:
        raise ValueError(f"num_coords must be >= 1, got {num_coords}")


def _check_grad(grad: Tensor, like: Tensor | None = None) -> None:
    """Refuses a gradient that would broadcast against the state instead of matching it."""
    if grad.ndim != 1:
        raise ValueError(f"grad must be a flat vector, got shape {tuple(grad.shape)}")
    if like is not None and grad.shape != like.shape:
        raise ValueError(
            f"grad has shape {tuple(grad.shape)} but the state has {tuple(like.shape)}"
        )


def _zeros(num_coords: int, device: torch.device | str) -> Tensor:
    _check_num_coords(num_coords)
    return torch.zeros(num_coords, device=device)


# -- SGD ---------------------------------------------------------------------------------------


class SGDState(NamedTuple):
    """SGD keeps no state."""


@dataclass(frozen=True)
class SGD:
    """Plain gradient descent: ``delta = −lr·g``.

    Args:
      lr (float): step size.
    """

    lr: float
    name: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        _check_lr(self.lr)

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> SGDState:
        _check_num_coords(num_coords)
        return SGDState()

    def update(self, grad: Tensor, state: SGDState) -> tuple[Tensor, SGDState]:
        _check_grad(grad)
        return -self.lr * grad, state


# -- Momentum ----------------------------------------------------------------------------------


class MomentumState(NamedTuple):
    accum: Tensor  # [p] float32 — velocity a_t = μ·a_{t-1} + g_t, zeros at t = 0


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball momentum as ``tf.train.MomentumOptimizer`` (= ``torch.optim.SGD(momentum=μ)``).

    ``a_t = μ a_{t-1} + g_t``; ``delta = −lr·a_t``.

    Args:
      lr (float): step size.
      momentum (float, optional): μ (default: 0.9).
    """

    lr: float
    momentum: float = 0.9
    name: ClassVar[str] = "momentum"

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_nonnegative("momentum", self.momentum)

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> MomentumState:
        return MomentumState(_zeros(num_coords, device))

    def update(self, grad: Tensor, state: MomentumState) -> tuple[Tensor, MomentumState]:
        _check_grad(grad, state.accum)
        accum = self.momentum * state.accum + grad
        return -self.lr * accum, MomentumState(accum)


# -- Adam --------------------------------------------------------------------------------------


def _one_minus_power(beta: float, step: Tensor) -> Tensor:
    """1 − β^t as −expm1(t·log β).

    In fp32, ``1 − 0.999^t`` loses ~1e-5 relative precision to cancellation (TF's fp32
    ``beta2_power`` does); this form keeps ordinary fp32 round-off.
    """
    if beta == 0.0:
        return torch.ones_like(step)
    return -torch.expm1(step * math.log(beta))


class AdamState(NamedTuple):
    m: Tensor  # [p] float32 — first moment, zeros at t = 0
    v: Tensor  # [p] float32 — second moment, zeros at t = 0
    step: Tensor  # [1] float32 — steps taken so far (0 at init)


@dataclass(frozen=True)
class Adam:
    """Adam as ``tf.train.AdamOptimizer`` (spec §4: TF defaults, hand-tuned lr per task).

    ``m_t = β1 m + (1−β1) g``, ``v_t = β2 v + (1−β2) g²``,
    ``delta = −lr·sqrt(1−β2^t)/(1−β1^t) · m_t / (sqrt(v_t) + ε)``.

    TF folds the bias corrections into the step size, so its ε sits outside the root of the
    *uncorrected* v. This equals ``torch.optim.Adam`` with ``eps = ε / sqrt(1 − β2^t)`` at step t;
    the two differ only where |g| is of order ε.

    Args:
      lr (float): step size.
      beta1 (float, optional): first-moment decay (default: 0.9).
      beta2 (float, optional): second-moment decay (default: 0.999).
      eps (float, optional): ε outside the square root (default: 1e-8).
    """

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    name: ClassVar[str] = "adam"

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_decay("beta1", self.beta1)
        _check_decay("beta2", self.beta2)
        _check_nonnegative("eps", self.eps)

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> AdamState:
        zeros = _zeros(num_coords, device)
        return AdamState(zeros, zeros.clone(), torch.zeros(1, device=device))

    def update(self, grad: Tensor, state: AdamState) -> tuple[Tensor, AdamState]:
        _check_grad(grad, state.m)
        step = state.step + 1.0
        m = self.beta1 * state.m + (1.0 - self.beta1) * grad
        v = self.beta2 * state.v + (1.0 - self.beta2) * grad.square()
        lr_t = (
            self.lr
            * torch.sqrt(_one_minus_power(self.beta2, step))
            / _one_minus_power(self.beta1, step)
        )
        return -lr_t * m / (torch.sqrt(v) + self.eps), AdamState(m, v, step)


# -- RMSProp -----------------------------------------------------------------------------------


class RMSPropState(NamedTuple):
    ms: Tensor  # [p] float32 — mean square of g; ONES at t = 0 (TF 1.x), not zeros
    mom: Tensor  # [p] float32 — momentum buffer (the last step when momentum = 0)


@dataclass(frozen=True)
class RMSProp:
    """RMSProp as ``tf.train.RMSPropOptimizer`` (uncentred).

    ``ms_t = ρ ms + (1−ρ) g²``; ``mom_t = μ mom + lr·g / sqrt(ms_t + ε)``; ``delta = −mom_t``.

    Two TF 1.x details differ from ``torch.optim.RMSprop``: the mean square starts at **1**, so
    early steps are small rather than ≈ lr/sqrt(1−ρ); and ε sits **inside** the root.

    Args:
      lr (float): step size.
      decay (float, optional): ρ (default: 0.9).
      momentum (float, optional): μ (default: 0.0).
      eps (float, optional): ε inside the square root (default: 1e-10).
    """

    lr: float
    decay: float = 0.9
    momentum: float = 0.0
    eps: float = 1e-10
    name: ClassVar[str] = "rmsprop"

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_decay("decay", self.decay)
        _check_nonnegative("momentum", self.momentum)
        _check_nonnegative("eps", self.eps)

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> RMSPropState:
        zeros = _zeros(num_coords, device)
        return RMSPropState(torch.ones_like(zeros), zeros)

    def update(self, grad: Tensor, state: RMSPropState) -> tuple[Tensor, RMSPropState]:
        _check_grad(grad, state.ms)
        ms = self.decay * state.ms + (1.0 - self.decay) * grad.square()
        mom = self.momentum * state.mom + self.lr * grad * torch.rsqrt(ms + self.eps)
        return -mom, RMSPropState(ms, mom)


# -- AdaGrad -----------------------------------------------------------------------------------


class AdagradState(NamedTuple):
    accum: Tensor  # [p] float32 — running sum of g², starts at initial_accumulator_value


@dataclass(frozen=True)
class Adagrad:
    """AdaGrad as ``tf.train.AdagradOptimizer``: ``A_t = A + g²``; ``delta = −lr·g/sqrt(A_t)``.

    No ε: the accumulator starts at 0.1, which keeps the root positive
    (``torch.optim.Adagrad(initial_accumulator_value=0.1, eps=0)`` is the same rule).

    Args:
      lr (float): step size.
      initial_accumulator_value (float, optional): A_0 (default: 0.1).
    """

    lr: float
    initial_accumulator_value: float = 0.1
    name: ClassVar[str] = "adagrad"

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_positive("initial_accumulator_value", self.initial_accumulator_value)

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> AdagradState:
        return AdagradState(_zeros(num_coords, device) + self.initial_accumulator_value)

    def update(self, grad: Tensor, state: AdagradState) -> tuple[Tensor, AdagradState]:
        _check_grad(grad, state.accum)
        accum = state.accum + grad.square()
        return -self.lr * grad * torch.rsqrt(accum), AdagradState(accum)


# -- AdaDelta ----------------------------------------------------------------------------------


class AdadeltaState(NamedTuple):
    accum: Tensor  # [p] float32 — running mean of g², zeros at t = 0
    accum_update: Tensor  # [p] float32 — running mean of the squared unit-step u², zeros


@dataclass(frozen=True)
class Adadelta:
    """AdaDelta as ``tf.train.AdadeltaOptimizer`` (= ``torch.optim.Adadelta``).

    ``A_t = ρ A + (1−ρ) g²``; ``u_t = sqrt(U + ε)/sqrt(A_t + ε) · g``;
    ``U_t = ρ U + (1−ρ) u_t²``; ``delta = −lr·u_t`` (lr scales the update, as in TF).

    Args:
      lr (float): step size (TF's default is 0.001; the paper's value is unreleased).
      rho (float, optional): decay ρ (default: 0.95).
      eps (float, optional): ε inside both roots (default: 1e-8).
    """

    lr: float
    rho: float = 0.95
    eps: float = 1e-8
    name: ClassVar[str] = "adadelta"

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_decay("rho", self.rho)
        # ε > 0 is what makes the very first step nonzero (U_0 = 0) and avoids 0/0.
        _check_positive("eps", self.eps)

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> AdadeltaState:
        zeros = _zeros(num_coords, device)
        return AdadeltaState(zeros, zeros.clone())

    def update(self, grad: Tensor, state: AdadeltaState) -> tuple[Tensor, AdadeltaState]:
        _check_grad(grad, state.accum)
        accum = self.rho * state.accum + (1.0 - self.rho) * grad.square()
        unit_step = torch.sqrt(state.accum_update + self.eps) * torch.rsqrt(accum + self.eps) * grad
        accum_update = self.rho * state.accum_update + (1.0 - self.rho) * unit_step.square()
        return -self.lr * unit_step, AdadeltaState(accum, accum_update)
