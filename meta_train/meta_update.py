"""One meta-update of θ, as a pure function: reject → average → clip → Adam at the scheduled lr.

Both the single-process loop (``training.train_local``) and the Ray learner apply their
meta-batch's gradients through ``meta_update``, so the two cannot drift apart; with staleness 0
they give bitwise the same θ (tests/meta_train/test_learner.py).

The sequence, for meta-step k with the B meta-gradients of its slots in slot order (spec §3):

1. *reject*: a gradient with a NaN or inf is dropped and counted, never zeroed;
2. *average*: the mean of the accepted gradients (``torch.stack(...).mean(0)``);
3. *clip*: scaled to norm ``clip_norm`` when its norm is larger (off by default);
   (``experimental.frozen`` entries' coordinates are zeroed first, by the ``trainable`` mask,
   so the clip and Adam never move them: Adam's moments there stay 0, its step exactly 0);
4. *Adam*: one step of torch's Adam on θ at lr_k (``torch.optim.adam.adam``, the function
   ``torch.optim.Adam.step`` runs, with the same arguments, so θ and the moments are bitwise
   what ``torch.optim.Adam`` gives and the checkpoints keep its state layout);
5. *schedule*: lr_k is ``meta_optim.lr``, halved every ``experimental.meta_lr_half_life`` steps.

When every gradient is rejected, θ and Adam's state stay exactly as they were; the meta-step
still counts (the schedule and the trajectories move on).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.optim.adam import adam as adam_step

from .experimental import ExperimentalConfig
from .optimizers.base import LearnedUpdateRule


@dataclasses.dataclass(frozen=True)
class MetaOptimConfig:
    """Adam on θ (spec §3: lr 1e-4, TF defaults, no decay, no clipping)."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = None  # global-norm clip of the averaged meta-gradient; None = off

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"meta lr must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"meta Adam betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")


class AdamState(NamedTuple):
    """torch Adam's state for θ, under the names ``torch.optim.Adam`` gives it."""

    step: Tensor  # [] float32: Adam steps taken (torch keeps the count as a tensor)
    exp_avg: Tensor  # [P] float32: first moment
    exp_avg_sq: Tensor  # [P] float32: second moment


class MetaState(NamedTuple):
    """θ between meta-updates."""

    step: int  # meta-steps taken, k: θ is θ_k (rejected-only steps count too)
    theta: Tensor  # [P] float32
    adam: AdamState


@dataclasses.dataclass(frozen=True)
class MetaUpdateInfo:
    """What one meta-update did."""

    accepted: int
    rejected: int
    grad_norm: float  # norm of the averaged gradient before clipping; nan if none accepted
    lr: float  # the meta lr of this step


def init_meta_state(
    theta: Tensor, *, step: int = 0, adam: Mapping[str, np.ndarray] | None = None
) -> MetaState:
    """θ at meta-step ``step`` with Adam's state as saved by ``adam_arrays`` (None or empty:
    Adam has not stepped yet, as torch's lazily created state)."""
    theta = theta.detach().clone()
    if not adam:
        zeros = torch.zeros_like(theta, memory_format=torch.preserve_format)
        moments = AdamState(torch.tensor(0.0), zeros, zeros.clone())
    else:
        missing = set(AdamState._fields) - set(adam)
        if missing:
            raise ValueError(f"Adam state lacks {sorted(missing)}")
        moments = AdamState(*(torch.tensor(adam[name]) for name in AdamState._fields))
        for name in ("exp_avg", "exp_avg_sq"):
            if getattr(moments, name).shape != theta.shape:
                raise ValueError(
                    f"Adam {name} has shape {tuple(getattr(moments, name).shape)}, θ "
                    f"{tuple(theta.shape)}"
                )
    return MetaState(step, theta, moments)


def adam_arrays(state: MetaState) -> dict[str, np.ndarray]:
    """Adam's state as numpy arrays (the checkpoint layout); empty before Adam's first step."""
    if float(state.adam.step) == 0:
        return {}
    return {name: np.array(value.numpy()) for name, value in state.adam._asdict().items()}


def trainable_mask(optimizer: LearnedUpdateRule, frozen: Sequence[str]) -> Tensor | None:
    """1 on the flat θ coordinates meta-training moves, 0 on those of the ``frozen`` entries;
    None when nothing is frozen (every coordinate trains, and no mask is applied)."""
    if not frozen:
        return None
    shapes = optimizer.theta_shapes()
    unknown = sorted(set(frozen) - set(shapes))
    if unknown:
        raise ValueError(
            f"experimental.frozen: {optimizer.name} has no θ entries {', '.join(unknown)} "
            f"(it has {', '.join(shapes)})"
        )
    if set(frozen) >= set(shapes):
        raise ValueError("experimental.frozen names every θ entry: nothing would be trained")
    mask = {
        name: torch.full(shape, 0.0 if name in frozen else 1.0) for name, shape in shapes.items()
    }
    return optimizer.flatten(mask)


def average_gradients(grads: Sequence[Tensor], clip_norm: float | None) -> tuple[Tensor, float]:
    """Mean of the accepted meta-gradients, clipped by global norm; returns (grad, norm)."""
    mean = torch.stack(list(grads)).mean(dim=0)
    norm = float(mean.norm())
    if clip_norm is not None and norm > clip_norm:
        mean = mean * (clip_norm / norm)
    return mean, norm


def meta_update(
    state: MetaState,
    grads: Sequence[Tensor],
    meta_optim: MetaOptimConfig,
    experimental: ExperimentalConfig | None = None,
    trainable: Tensor | None = None,
) -> tuple[MetaState, MetaUpdateInfo]:
    """Applies meta-step ``state.step``'s gradients to θ (see the module docstring).

    Args:
      state: θ_k and Adam's state; not changed (the result holds new tensors).
      grads: the meta-step's gradients, one per slot, in slot order (non-finite ones included:
        they are rejected here).
      meta_optim: Adam's hyperparameters and the clip.
      experimental: the meta lr's schedule (``meta_lr_half_life``); None: constant.
      trainable: ``trainable_mask`` of ``experimental.frozen``; None: every coordinate trains.

    Returns:
      ``(state at k + 1, what the update did)``.
    """
    experimental = experimental or ExperimentalConfig()
    lr = experimental.meta_lr_at(meta_optim.lr, state.step)
    accepted = [g for g in grads if bool(torch.isfinite(g).all())]
    info = MetaUpdateInfo(len(accepted), len(grads) - len(accepted), math.nan, lr)
    if not accepted:
        return state._replace(step=state.step + 1), info
    if trainable is not None:
        accepted = [g * trainable for g in accepted]
    grad, norm = average_gradients(accepted, meta_optim.clip_norm)
    theta = state.theta.clone()
    adam = AdamState(*(t.clone() for t in state.adam))
    with torch.no_grad():
        adam_step(
            [theta],
            [grad],
            [adam.exp_avg],
            [adam.exp_avg_sq],
            [],
            [adam.step],
            foreach=None,  # as torch.optim.Adam: the single-tensor path for a CPU tensor
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=False,
            decoupled_weight_decay=False,
            amsgrad=False,
            beta1=meta_optim.beta1,
            beta2=meta_optim.beta2,
            lr=lr,
            weight_decay=0.0,
            eps=meta_optim.eps,
            maximize=False,
        )
    return MetaState(state.step + 1, theta, adam), dataclasses.replace(info, grad_norm=norm)
