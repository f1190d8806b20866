"""The meta-training recipe shared by the single-process loop and the Ray learner (spec §3).

Schedule: a meta-batch of B *slots*, each running its own chain of trajectories. At meta-step s,
slot b is in trajectory ``s // K`` at truncation ``s % K`` (K = horizon / truncation = 5), or,
with log-uniform horizons, where its own drawn trajectory lengths put it
(``schedule.TrajectorySchedule``). The task of a trajectory is
``family.sample(task_seed(run_seed, b, trajectory))``, and its meta-gradient comes from truncated
BPTT or PES (``experimental.estimator``), so the work of every meta-step is a pure function of
(run seed, step, slot, θ): the final θ does not depend on how many processes computed it, or on
work being redone.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from runtime.theta import theta_sha256

from .experimental import EstimatorConfig, ExperimentalConfig
from .meta_update import (
    MetaOptimConfig,
    MetaState,
    init_meta_state,
    meta_update,
    trainable_mask,
)
from .optimizers.base import LearnedUpdateRule
from .pes import PESState, pes_slot, start_state
from .schedule import TrajectorySchedule
from .seeding import derive_seed, generator
from .tasks.base import Task, TaskFamily
from .theta_source import load_theta_source
from .unroll import Trajectory, UnrollConfig, UnrollResult, start_trajectory, unroll_truncation

SlotState = Trajectory | PESState  # what a slot carries between truncations, per estimator


@dataclasses.dataclass(frozen=True)
class ThetaInitConfig:
    """Where θ starts: the spec's random initialisation or a given θ.

    "spec" is the paper's (spec §2.4). "theta" starts at a trained θ (fine-tuning): ``theta``
    names a θ file, a folder holding ``theta.npz`` or a built-in ("hyperadam"); ``theta_sha256``
    pins its content (``runtime.theta.theta_sha256``; ``build_config`` fills it in from the
    file, and the run refuses a file that has changed). The experiments that change the start
    (Adam's reduction, a scaled StateCell kernel) are in ``experimental.ExperimentalConfig``.
    """

    kind: str = "spec"  # "spec" (spec §2.4) or "theta"
    theta: str | None = None  # kind "theta": where θ is read from
    theta_sha256: str | None = None  # kind "theta": the digest that θ must have

    def __post_init__(self) -> None:
        if self.kind not in THETA_INITS:
            raise ValueError(f"init.kind must be one of {THETA_INITS}, got {self.kind!r}")
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


THETA_INITS = ("spec", "theta")


def task_seed(run_seed: int, slot: int, trajectory: int) -> int:
    """Seed of the task (tricks, init, minibatches) of one trajectory of one slot."""
    return derive_seed(run_seed, 7, slot, trajectory)


def theta_init_seed(run_seed: int) -> int:
    """Seed of θ's initialisation."""
    return derive_seed(run_seed, 11)


def init_theta_flat(
    optimizer: LearnedUpdateRule,
    run_seed: int,
    init: ThetaInitConfig = ThetaInitConfig(),
    experimental: ExperimentalConfig | None = None,
) -> Tensor:
    """θ at the start of a run, flat: ``init``'s θ, then the experiments that change it."""
    experimental = experimental or ExperimentalConfig()
    if init.kind == "theta":
        theta = optimizer.unflatten(_given_theta_flat(optimizer, init))
    else:
        theta = optimizer.init_theta(generator(theta_init_seed(run_seed)))
    adam = experimental.adam_start
    if adam is not None:
        reduce = getattr(optimizer, "adam_reduction", None)
        if reduce is None:
            raise ValueError(f"experimental.adam_start needs HyperAdam, not {optimizer.name}")
        theta = reduce(theta, lr=adam.lr, beta1=adam.beta1, beta2=adam.beta2)
    scale = experimental.pre_kernel_scale
    if scale != 1.0:
        if optimizer.name != "hyperadam":
            raise ValueError(
                f"experimental.pre_kernel_scale needs HyperAdam, not {optimizer.name}"
            )
        theta = {**theta, "pre_kernel": theta["pre_kernel"] * scale}
    return optimizer.flatten(theta)


def read_theta_sha256(source: str) -> str:
    """The digest of the θ at ``source`` (file, folder or built-in name)."""
    _, theta = load_theta_source(source)
    return _theta_digest(theta)


def _theta_digest(theta: dict[str, Tensor]) -> str:
    return theta_sha256({name: value.numpy() for name, value in theta.items()})


def _given_theta_flat(optimizer: LearnedUpdateRule, init: ThetaInitConfig) -> Tensor:
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
    """(trajectory index, truncation index) of every slot at meta-step ``step`` (fixed
    horizons; ``schedule.TrajectorySchedule.position`` in general)."""
    k = unroll.truncations_per_trajectory
    return step // k, step % k


def slot_start(
    optimizer: LearnedUpdateRule,
    family: TaskFamily,
    unroll: UnrollConfig,
    run_seed: int,
    slot: int,
    step: int,
    trajectory: Any,
    *,
    estimator: EstimatorConfig | None = None,
    schedule: TrajectorySchedule | None = None,
) -> tuple[Task, Any]:
    """The task of one slot at one meta-step and the state its truncation continues: a new
    one at a trajectory's first truncation, else ``trajectory`` (checked to be that slot's).

    The state is a ``Trajectory`` for truncated BPTT and a ``pes.PESState`` for PES;
    ``schedule`` (default: ``unroll``'s fixed horizon) says where the slot's trajectories
    begin.

    Raises:
      ValueError: the slot is mid-trajectory without a state, or its state has the wrong seed.
    """
    schedule = schedule or TrajectorySchedule(unroll)
    estimator = estimator or EstimatorConfig()
    where = schedule.position(slot, step)
    seed = task_seed(run_seed, slot, where.trajectory)
    task = family.build(family.sample(seed))
    trunc_index = where.truncation
    if trunc_index == 0:
        if estimator.kind == "pes":
            num_theta = optimizer.num_meta_parameters()
            return task, start_state(optimizer, task, seed, num_theta, estimator.pairs)
        return task, start_trajectory(optimizer, task, seed)
    if trajectory is None:
        raise ValueError(
            f"slot {slot} at step {step} is mid-trajectory (truncation {trunc_index}) "
            "but no trajectory state was given"
        )
    expected = PESState if estimator.kind == "pes" else Trajectory
    if not isinstance(trajectory, expected):
        raise ValueError(
            f"slot {slot} at step {step}: estimator {estimator.kind!r} continues a "
            f"{expected.__name__}, got a {type(trajectory).__name__}"
        )
    if trajectory.seed != seed:
        raise ValueError(
            f"slot {slot} at step {step} expects trajectory seed {seed}, got {trajectory.seed}"
        )
    return task, trajectory


def slot_work(
    optimizer: LearnedUpdateRule,
    family: TaskFamily,
    unroll: UnrollConfig,
    theta_flat: Tensor,
    run_seed: int,
    slot: int,
    step: int,
    trajectory: Any,
    *,
    estimator: EstimatorConfig | None = None,
    schedule: TrajectorySchedule | None = None,
) -> UnrollResult:
    """The work of one slot at one meta-step: build its task, run one truncation and estimate
    its meta-gradient (truncated BPTT, or PES: ``estimator``).

    ``trajectory`` is the slot's carried state (a ``Trajectory``, or PES's ``PESState``, which
    the result's ``trajectory`` then is too). It may be None only at the first truncation of a
    trajectory: replaying earlier truncations with the current θ would not give the same
    state, so callers that lose it (a dead worker) rebuild it by replaying them with the θ
    versions they first used (``worker.rebuild_trajectory``; the learner keeps those versions).
    """
    estimator = estimator or EstimatorConfig()
    task, state = slot_start(
        optimizer, family, unroll, run_seed, slot, step, trajectory,
        estimator=estimator, schedule=schedule,
    )  # fmt: skip
    if estimator.kind == "pes":
        return pes_slot(
            optimizer, theta_flat, task, state, unroll,
            sigma=estimator.sigma, run_seed=run_seed, slot=slot, step=step,
        )  # fmt: skip
    return unroll_truncation(optimizer, theta_flat, task, state, unroll)


def local_updates(
    optimizer: LearnedUpdateRule,
    family: TaskFamily,
    *,
    run_seed: int,
    unroll: UnrollConfig,
    meta_optim: MetaOptimConfig,
    meta_batch: int,
    theta_flat: Tensor,
    experimental: ExperimentalConfig,
) -> Iterator[tuple[MetaState, dict[str, Any]]]:
    """The single-process meta-training loop, one update per iteration, without end.

    Yields the meta-state after each update and its metrics. The work of every slot is
    ``slot_work`` with the run's estimator and trajectory schedule (``experimental``), the
    update is ``meta_update``: what the Ray learner and its workers compute, in one process.
    """
    schedule = TrajectorySchedule(unroll, experimental.horizons, run_seed)
    trainable = trainable_mask(optimizer, experimental.frozen)
    state = init_meta_state(theta_flat)
    slots: list[SlotState | None] = [None] * meta_batch
    step = 0
    while True:
        results = []
        for slot in range(meta_batch):
            result = slot_work(
                optimizer, family, unroll, state.theta, run_seed, slot, step, slots[slot],
                estimator=experimental.estimator, schedule=schedule,
            )  # fmt: skip
            slots[slot] = result.trajectory
            results.append(result)
        state, update = meta_update(
            state, [r.meta_grad for r in results], meta_optim, experimental, trainable
        )
        yield state, {
            "step": step,
            "meta_loss": sum(r.meta_loss for r in results) / len(results),
            "grad_norm": update.grad_norm,
            "rejected": update.rejected,
        }
        step += 1


def train_local(
    optimizer: LearnedUpdateRule,
    family: TaskFamily,
    *,
    steps: int,
    run_seed: int,
    unroll: UnrollConfig | None = None,
    meta_optim: MetaOptimConfig | None = None,
    meta_batch: int = 1,
    theta_flat: Tensor | None = None,
    experimental: ExperimentalConfig | None = None,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """The plain single-process meta-training loop (tests, small experiments, benchmarks).

    ``experimental`` supplies the meta lr's schedule (its ``meta_lr_half_life``), the
    meta-gradient estimator and the trajectories' horizons; θ starts at ``theta_flat`` or the
    spec's initialisation. Returns the final flat θ and one metrics dict per meta-step.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if meta_batch < 1:
        raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
    unroll = unroll or UnrollConfig()
    meta_optim = meta_optim or MetaOptimConfig()
    experimental = experimental or ExperimentalConfig()
    theta = init_theta_flat(optimizer, run_seed) if theta_flat is None else theta_flat
    state = init_meta_state(theta)
    updates = local_updates(
        optimizer, family, run_seed=run_seed, unroll=unroll, meta_optim=meta_optim,
        meta_batch=meta_batch, theta_flat=theta, experimental=experimental,
    )  # fmt: skip
    history = []
    for state, metrics in itertools.islice(updates, steps):  # noqa: B007  # the last one is kept
        history.append(metrics)
    return state.theta, history
