"""The meta-training recipe shared by the single-process loop and the Ray learner (spec §3).

Schedule: a meta-batch of B *slots*, each running its own chain of trajectories. At meta-step s,
slot b is in trajectory ``s // K`` at truncation ``s % K`` (K = horizon / truncation = 5). The
task of a trajectory is ``family.sample(task_seed(run_seed, b, trajectory))``, so the work of
every meta-step is a pure function of (run seed, step, slot): the final θ does not depend on how
many processes computed it, or on work being redone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from .optimizers.base import LearnedOptimizer
from .seeding import derive_seed, generator
from .tasks.base import TaskFamily
from .unroll import Trajectory, UnrollConfig, UnrollResult, start_trajectory, unroll_truncation


@dataclasses.dataclass(frozen=True)
class MetaOptimConfig:
    """Adam on θ (spec §3: lr 1e-4, TF defaults, no decay, no clipping)."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = None  # global-norm clip of the averaged meta-gradient; None = off
    # An experiment: the meta lr halves every `half_life` meta-steps (lr · 2^(−k / half_life)),
    # so θ settles near where a high lr took it instead of wandering on; None = constant.
    half_life: float | None = None

    def lr_at(self, step: int) -> float:
        """The meta lr of meta-step ``step`` (0-based)."""
        return self.lr if self.half_life is None else self.lr * 2.0 ** (-step / self.half_life)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"meta lr must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"meta Adam betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        if self.half_life is not None:
            value = self.half_life
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (value > 0 and math.isfinite(value))
            ):
                raise ValueError(f"half_life must be a number > 0 or None, got {value!r}")
            object.__setattr__(self, "half_life", float(value))


@dataclasses.dataclass(frozen=True)
class ThetaInitConfig:
    """Where θ starts: the spec's random initialisation, HyperAdam reduced to Adam, or a given θ.

    "adam" (an experiment, not the paper's recipe) starts meta-training at Adam(lr, β1, β2)
    exactly (``HyperAdam.adam_reduction``) with the StateCell at its random initialisation, so
    meta-training begins at the baseline instead of having to rediscover it. "theta" starts at
    a trained θ (fine-tuning): ``theta`` names a θ file, a folder holding ``theta.npz`` or a
    built-in ("hyperadam"); ``theta_sha256`` pins its content (``export.theta_io.theta_sha256``;
    ``build_config`` fills it in from the file, and the run refuses a file that has changed).

    ``pre_kernel_scale`` (an experiment, HyperAdam only) multiplies the StateCell's input kernel
    ``a`` after the start θ is made. The StateCell reads ĝ = g/‖g‖, whose coordinates are of
    order 1/√p (≈ 0.008 on the MNIST MLP); with ``a`` of order 0.1 its input is ELU(b) to
    within 1 %, so every coordinate and every task gets the same ρ and decay rates. Scaling
    ``a`` lets the cells see the gradient from the first update on.
    """

    kind: str = "spec"  # "spec" (spec §2.4), "adam" (HyperAdam only) or "theta"
    adam_lr: float = 0.0220971  # the tuned Adam lr of the ReLU/ELU MLPs (spec §5.1)
    beta1: float = 0.9
    beta2: float = 0.999
    theta: str | None = None  # kind "theta": where θ is read from
    theta_sha256: str | None = None  # kind "theta": the digest that θ must have
    pre_kernel_scale: float = 1.0  # HyperAdam: the start θ's StateCell input kernel × this

    def __post_init__(self) -> None:
        if self.kind not in THETA_INITS:
            raise ValueError(f"init.kind must be one of {THETA_INITS}, got {self.kind!r}")
        for name in ("adam_lr", "beta1", "beta2", "pre_kernel_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"init.{name} must be a number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError(f"init betas must be < 1, got {self.beta1}, {self.beta2}")
        if self.kind == "theta":
            if not isinstance(self.theta, str) or not self.theta:
                raise ValueError(f"init.kind 'theta' needs init.theta (a θ source), got "
                                 f"{self.theta!r}")
        elif self.theta is not None or self.theta_sha256 is not None:
            raise ValueError(f"init.theta and init.theta_sha256 apply to init.kind 'theta' only, "
                             f"not {self.kind!r}")
        digest = self.theta_sha256
        if digest is not None and not (
            isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")
        ):
            raise ValueError(f"init.theta_sha256 must be 64 lowercase hex digits, got {digest!r}")


THETA_INITS = ("spec", "adam", "theta")


def task_seed(run_seed: int, slot: int, trajectory: int) -> int:
    """Seed of the task (tricks, init, minibatches) of one trajectory of one slot."""
    return derive_seed(run_seed, 7, slot, trajectory)


def theta_init_seed(run_seed: int) -> int:
    """Seed of θ's initialisation."""
    return derive_seed(run_seed, 11)


def init_theta_flat(
    optimizer: LearnedOptimizer, run_seed: int, init: ThetaInitConfig = ThetaInitConfig()
) -> Tensor:
    """θ at the start of a run, flat."""
    if init.kind == "theta":
        theta = optimizer.unflatten(_given_theta_flat(optimizer, init))
    else:
        theta = optimizer.init_theta(generator(theta_init_seed(run_seed)))
    if init.kind == "adam":
        reduce = getattr(optimizer, "adam_reduction", None)
        if reduce is None:
            raise ValueError(f"init.kind 'adam' needs HyperAdam, not {optimizer.name}")
        theta = reduce(theta, lr=init.adam_lr, beta1=init.beta1, beta2=init.beta2)
    if init.pre_kernel_scale != 1.0:
        if optimizer.name != "hyperadam":
            raise ValueError(f"init.pre_kernel_scale needs HyperAdam, not {optimizer.name}")
        theta = {**theta, "pre_kernel": theta["pre_kernel"] * init.pre_kernel_scale}
    return optimizer.flatten(theta)


def read_theta_sha256(source: str) -> str:
    """The digest of the θ at ``source`` (file, folder or built-in name)."""
    from export.theta_io import load_theta_source  # export depends on meta_train

    _, theta = load_theta_source(source)
    return _theta_digest(theta)


def _theta_digest(theta: dict[str, Tensor]) -> str:
    from export.theta_io import theta_sha256

    return theta_sha256({name: value.numpy() for name, value in theta.items()})


def _given_theta_flat(optimizer: LearnedOptimizer, init: ThetaInitConfig) -> Tensor:
    from export.theta_io import load_theta_source

    source = str(init.theta)
    given, theta = load_theta_source(source)
    expected = optimizer.unflatten(optimizer.flatten(optimizer.init_theta(generator(0))))
    if given.name != optimizer.name or {k: tuple(v.shape) for k, v in theta.items()} != {
        k: tuple(v.shape) for k, v in expected.items()
    }:
        raise ValueError(
            f"init.theta {source!r} holds a {given.name} θ that does not fit this run's "
            f"{optimizer.name} (check the optimizer and num_candidates)"
        )
    digest = _theta_digest(theta)
    if init.theta_sha256 is not None and digest != init.theta_sha256:
        raise ValueError(
            f"init.theta {source!r} has changed: its θ digest is {digest}, the run was "
            f"configured with {init.theta_sha256}"
        )
    return optimizer.flatten(theta)


def position(step: int, unroll: UnrollConfig) -> tuple[int, int]:
    """(trajectory index, truncation index) of every slot at meta-step ``step``."""
    k = unroll.truncations_per_trajectory
    return step // k, step % k


def make_meta_optimizer(theta: Tensor, config: MetaOptimConfig) -> torch.optim.Adam:
    return torch.optim.Adam(
        [theta], lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
    )


def average_gradients(grads: list[Tensor], clip_norm: float | None) -> tuple[Tensor, float]:
    """Mean of the accepted meta-gradients, clipped by global norm; returns (grad, norm)."""
    mean = torch.stack(grads).mean(dim=0)
    norm = float(mean.norm())
    if clip_norm is not None and norm > clip_norm:
        mean = mean * (clip_norm / norm)
    return mean, norm


def apply_meta_gradient(
    theta: Tensor, meta_opt: torch.optim.Adam, grad: Tensor, lr: float | None = None
) -> None:
    """One Adam step on θ (in place), at ``lr`` when given (the schedule's value)."""
    if lr is not None:
        for group in meta_opt.param_groups:
            group["lr"] = lr
    theta.grad = grad.clone()
    meta_opt.step()
    theta.grad = None


def slot_work(
    optimizer: LearnedOptimizer,
    family: TaskFamily,
    unroll: UnrollConfig,
    theta_flat: Tensor,
    run_seed: int,
    slot: int,
    step: int,
    trajectory: Trajectory | None,
) -> UnrollResult:
    """The work of one slot at one meta-step: build its task, run one truncation.

    ``trajectory`` is the slot's carried inner state. It may be None only at the first truncation
    of a trajectory: replaying earlier truncations with the current θ would not give the same
    state, so callers that lose it (a dead worker) rebuild it by replaying them with the θ
    versions they first used (``worker.rebuild_trajectory``; the learner keeps those versions).
    """
    traj_index, trunc_index = position(step, unroll)
    seed = task_seed(run_seed, slot, traj_index)
    task = family.build(family.sample(seed))
    if trunc_index == 0:
        trajectory = start_trajectory(optimizer, task, seed)
    elif trajectory is None:
        raise ValueError(
            f"slot {slot} at step {step} is mid-trajectory (truncation {trunc_index}) "
            "but no trajectory state was given"
        )
    elif trajectory.seed != seed:
        raise ValueError(
            f"slot {slot} at step {step} expects trajectory seed {seed}, got {trajectory.seed}"
        )
    return unroll_truncation(optimizer, theta_flat, task, trajectory, unroll)


def train_local(
    optimizer: LearnedOptimizer,
    family: TaskFamily,
    *,
    steps: int,
    run_seed: int,
    unroll: UnrollConfig | None = None,
    meta_optim: MetaOptimConfig | None = None,
    meta_batch: int = 1,
    theta_flat: Tensor | None = None,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """The plain single-process meta-training loop (tests, small experiments, benchmarks).

    Returns the final flat θ and one metrics dict per meta-step.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if meta_batch < 1:
        raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
    unroll = unroll or UnrollConfig()
    meta_optim = meta_optim or MetaOptimConfig()
    theta = (init_theta_flat(optimizer, run_seed) if theta_flat is None else theta_flat).clone()
    theta.requires_grad_(True)
    meta_opt = make_meta_optimizer(theta, meta_optim)
    trajectories: list[Trajectory | None] = [None] * meta_batch
    history = []
    for step in range(steps):
        results = []
        for slot in range(meta_batch):
            result = slot_work(
                optimizer, family, unroll, theta.detach(), run_seed, slot, step, trajectories[slot]
            )
            trajectories[slot] = result.trajectory
            results.append(result)
        grads = [r.meta_grad for r in results if torch.isfinite(r.meta_grad).all()]
        rejected = len(results) - len(grads)
        norm = float("nan")
        if grads:
            grad, norm = average_gradients(grads, meta_optim.clip_norm)
            apply_meta_gradient(theta, meta_opt, grad, meta_optim.lr_at(step))
        history.append(
            {
                "step": step,
                "meta_loss": sum(r.meta_loss for r in results) / len(results),
                "grad_norm": norm,
                "rejected": rejected,
            }
        )
    return theta.detach(), history
