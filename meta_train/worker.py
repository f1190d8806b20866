"""Gradient workers: a thin Ray actor over ``training.slot_work`` (design §3.3, style §6.13).

A worker owns a few *slots* of the meta-batch. Each call gives it θ (an ``ObjectRef`` the learner
``ray.put`` once per version, resolved by Ray before the call), the θ version and one ``SlotWork``
per slot: which meta-step to compute and, only when the worker does not already hold the slot's
state, a ``Rebuild``. The worker keeps every slot's trajectory (optimizee parameters and optimizer
state, O(p·J)) between calls and never sends it: what travels back is the meta-gradient (O(θ))
and a few numbers per slot (``messages.py``), so the learner's traffic does not grow with the
optimizee.

A lost trajectory (a replaced worker, a resumed learner) is rebuilt, not shipped: every
truncation is a pure function of (run seed, slot, step, θ it used), so replaying the truncations
since the trajectory's start with the θ versions they used gives the lost state bitwise. That is
at most one horizon of replay (K − 1 truncations), and the learner only has to keep those θ
versions. The same holds for PES (``experimental.estimator``): a slot's state is its antithetic
pairs and their accumulated perturbations, whose ε derive from (run seed, slot, step), so the
replay rebuilds them exactly too; what PES sends back is its estimate, O(θ), like a gradient.
It never talks to MLflow.

Everything here runs without Ray: ``GradientWorker`` is a plain class that the learner wraps with
``ray.remote`` and that tests drive directly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .batched import slots_work_batched, to_device
from .experimental import EstimatorConfig
from .messages import Rebuild, SlotResult, SlotWork, TrajectoryArrays, WorkerResult
from .optimizers.base import LearnedUpdateRule
from .schedule import TrajectorySchedule
from .tasks.base import TaskFamily
from .training import SlotState, slot_work, task_seed
from .unroll import Trajectory, UnrollConfig, UnrollResult

__all__ = [  # the messages, importable from here as before
    "FaultInjection",
    "GradientWorker",
    "Rebuild",
    "SlotResult",
    "SlotWork",
    "TrajectoryArrays",
    "WorkerResult",
    "compute_slot",
    "rebuild_trajectory",
]

if TYPE_CHECKING:
    from .run_config import RunConfig


@dataclasses.dataclass(frozen=True)
class FaultInjection:
    """Test hook: faults a worker injects on purpose (never set in real runs)."""

    nan_grads: frozenset[tuple[int, int]] = frozenset()  # (step, slot) answered with NaNs
    # Meta-steps the worker computes, once, with the θ it already holds instead of the one sent
    # (an out-of-date θ cache): an honest gradient of an older version, for the staleness guard.
    stale_theta: frozenset[int] = frozenset()
    slow_workers: frozenset[int] = frozenset()  # worker ids that sleep ``delay_s`` per call
    delay_s: float = 0.0


def compute_slot(
    optimizer: LearnedUpdateRule,
    family: TaskFamily,
    unroll: UnrollConfig,
    theta: torch.Tensor,
    *,
    run_seed: int,
    version: int,
    work: SlotWork,
    trajectory: SlotState | None,
    faults: FaultInjection | None = None,
    estimator: EstimatorConfig | None = None,
    schedule: TrajectorySchedule | None = None,
) -> tuple[SlotResult, SlotState]:
    """Runs ``slot_work`` for one slot and packs the message (pure apart from timing).

    Returns the message and the advanced state in torch form (kept by the worker).

    Raises:
      ValueError: the trajectory given is not where the slot's schedule says it must be.
    """
    schedule = schedule or TrajectorySchedule(unroll)
    trunc_index = schedule.position(work.slot, work.step).truncation
    expected_inner = trunc_index * unroll.truncation
    if trunc_index and trajectory is not None and trajectory.step != expected_inner:
        raise ValueError(
            f"slot {work.slot} at step {work.step} needs the trajectory after inner step "
            f"{expected_inner}, got one after {trajectory.step}"
        )
    start = time.perf_counter()
    out = slot_work(
        optimizer, family, unroll, theta, run_seed, work.slot, work.step, trajectory,
        estimator=estimator, schedule=schedule,
    )  # fmt: skip
    message = pack_result(
        out, work, unroll, run_seed=run_seed, version=version, faults=faults,
        compute_s=time.perf_counter() - start, schedule=schedule,
    )
    return message, out.trajectory


def pack_result(
    out: UnrollResult,
    work: SlotWork,
    unroll: UnrollConfig,
    *,
    run_seed: int,
    version: int,
    faults: FaultInjection | None,
    compute_s: float,
    schedule: TrajectorySchedule | None = None,
) -> SlotResult:
    """The message of one slot's truncation (the meta-gradient leaves the device here)."""
    traj_index = (schedule or TrajectorySchedule(unroll)).position(work.slot, work.step).trajectory
    grad = out.meta_grad.detach().cpu().numpy()
    if faults is not None and (work.step, work.slot) in faults.nan_grads:
        grad = np.full_like(grad, np.nan)
    finite = bool(np.isfinite(grad).all())
    return SlotResult(
        slot=work.slot,
        step=work.step,
        version=version,
        task_seed=task_seed(run_seed, work.slot, traj_index),
        meta_grad=grad,
        meta_loss=float(out.meta_loss),
        inner_step=int(out.trajectory.step),
        inner_losses=tuple(out.inner_losses),
        grad_norm=float(np.linalg.norm(grad)) if finite else float("nan"),
        compute_s=compute_s,
    )


def rebuild_trajectory(
    optimizer: LearnedUpdateRule,
    family: TaskFamily,
    unroll: UnrollConfig,
    thetas: Mapping[int, torch.Tensor],
    *,
    run_seed: int,
    slot: int,
    step: int,
    rebuild: Rebuild,
    state_type: type,
    estimator: EstimatorConfig | None = None,
    schedule: TrajectorySchedule | None = None,
) -> SlotState | None:
    """The slot's state at the start of meta-step ``step``, by replaying its truncations.

    Each replayed truncation is ``slot_work`` exactly as it first ran (same θ, same code path,
    same estimator, gradient included), so the state (a trajectory, or PES's pairs with their
    accumulated perturbations) is bitwise the lost one. None when ``step`` starts a trajectory
    and nothing needs replaying.

    Raises:
      ValueError: the replay would not start at the trajectory's start or at ``base``, or a θ
        version it needs was not sent.
    """
    first, trajectory = replay_start(
        unroll, thetas, slot=slot, step=step, rebuild=rebuild, state_type=state_type,
        schedule=schedule,
    )  # fmt: skip
    state: SlotState | None = trajectory
    for replayed_step, version in enumerate(rebuild.versions, start=first):
        state = slot_work(
            optimizer, family, unroll, thetas[version], run_seed, slot, replayed_step, state,
            estimator=estimator, schedule=schedule,
        ).trajectory  # fmt: skip
    return state


def replay_start(
    unroll: UnrollConfig,
    thetas: Mapping[int, torch.Tensor],
    *,
    slot: int,
    step: int,
    rebuild: Rebuild,
    state_type: type,
    schedule: TrajectorySchedule | None = None,
) -> tuple[int, Trajectory | None]:
    """The first meta-step a replay runs and the state it starts from (checked)."""
    first = step - len(rebuild.versions)
    trunc_index = (schedule or TrajectorySchedule(unroll)).position(slot, step).truncation
    start = step - trunc_index
    if rebuild.base is None:
        if first != start and trunc_index:
            raise ValueError(
                f"slot {slot} at step {step}: a replay from the trajectory's start must begin "
                f"at step {start}, the versions given begin at {first}"
            )
        trajectory = None
    else:
        trajectory = rebuild.base.to_trajectory(state_type)
        if trajectory.step != (first - start) * unroll.truncation or first < start:
            raise ValueError(
                f"slot {slot} at step {step}: the replay base is after inner step "
                f"{trajectory.step}, the versions given begin at step {first}"
            )
    missing = sorted(set(rebuild.versions) - set(thetas))
    if missing:
        raise ValueError(f"slot {slot}: θ versions {missing} are needed to replay, not sent")
    return first, trajectory


class GradientWorker:
    """The actor: builds the optimizer and the task family once, then computes slots.

    Args:
      worker_id: the learner's index of this worker (reported back in every message).
      config: the run's ``RunConfig`` (optimizer, family, unroll, seed).
      data_dir: dataset folder for the family (None: the packaged MNIST).
      faults: test-only fault injection.
    """

    def __init__(
        self,
        worker_id: int,
        config: RunConfig,
        data_dir: str | Path | None = None,
        faults: FaultInjection | None = None,
    ) -> None:
        # One intra-op thread per worker: workers are the parallelism (one CPU each), and a
        # fixed thread count keeps reductions in the same order as the single-process loop.
        torch.set_num_threads(1)
        self.worker_id = worker_id
        self.run_seed = config.seed
        self.unroll = config.unroll
        self.optimizer = config.make_optimizer()
        self.family = config.make_family(data_dir)
        self.faults = faults
        self.device = torch.device(config.device)
        self.batched = config.batched
        self.estimator = config.experimental.estimator
        self.schedule = config.make_schedule()
        self._state_type = type(self.optimizer.init_state(1))
        self._trajectories: dict[int, SlotState] = {}
        self._theta: torch.Tensor | None = None
        self._theta_version = -1
        self._faults_fired: set[int] = set()
        # Load the dataset now (once per actor), not inside the first timed call.
        self.family.build(self.family.sample(0))

    def ping(self) -> int:
        """The worker's process id (the learner's liveness probe; tests kill it)."""
        return os.getpid()

    def compute(
        self,
        theta: Any,
        version: int,
        work: tuple[SlotWork, ...],
        replay_thetas: Mapping[int, Any] | None = None,
    ) -> WorkerResult:
        """Computes the meta-gradients of ``work`` with θ of ``version``.

        ``theta`` arrives resolved from the learner's ``ray.put`` (a read-only numpy array);
        it is converted once per version. ``replay_thetas`` (version → θ) holds the θs that the
        work's ``Rebuild``s replay with; only sent when some slot must be rebuilt.
        """
        start = time.perf_counter()
        if self.faults is not None and self.worker_id in self.faults.slow_workers:
            time.sleep(self.faults.delay_s)
        computed_version = version
        stale = self._stale_fault(work)
        if not stale and (version != self._theta_version or self._theta is None):
            self._theta = torch.tensor(np.asarray(theta, dtype=np.float32), device=self.device)
            self._theta_version = version
        elif stale:
            computed_version = self._theta_version
        replay = {v: torch.tensor(np.asarray(t, dtype=np.float32), device=self.device)
                  for v, t in (replay_thetas or {}).items()}
        if self.batched:
            results = self._compute_batched(computed_version, work, replay)
        else:
            results = self._compute_slots(computed_version, work, replay)
        return WorkerResult(
            worker_id=self.worker_id,
            pid=os.getpid(),
            version=version,
            results=tuple(results),
            compute_s=time.perf_counter() - start,
        )

    def _compute_slots(
        self, computed_version: int, work: tuple[SlotWork, ...], replay: Mapping[int, torch.Tensor]
    ) -> list[SlotResult]:
        """One slot after another, each continuing its trajectory (rebuilt if it was lost)."""
        assert self._theta is not None  # set by compute, or cached from an earlier call
        results = []
        for item in work:
            replayed = 0
            trajectory: SlotState | None
            if item.rebuild is not None:
                trajectory = rebuild_trajectory(
                    self.optimizer, self.family, self.unroll, replay,
                    run_seed=self.run_seed, slot=item.slot, step=item.step,
                    rebuild=item.rebuild, state_type=self._state_type,
                    estimator=self.estimator, schedule=self.schedule,
                )
                replayed = len(item.rebuild.versions)
            else:
                trajectory = self._trajectories.get(item.slot)
            message, advanced = compute_slot(
                self.optimizer,
                self.family,
                self.unroll,
                self._theta,
                run_seed=self.run_seed,
                version=computed_version,
                work=item,
                trajectory=trajectory,
                faults=self.faults,
                estimator=self.estimator,
                schedule=self.schedule,
            )
            self._trajectories[item.slot] = advanced
            results.append(dataclasses.replace(message, replayed=replayed) if replayed else message)
        return results

    def _compute_batched(
        self, version: int, work: tuple[SlotWork, ...], replay: Mapping[int, torch.Tensor]
    ) -> list[SlotResult]:
        """Every slot of ``work`` (one meta-step) as one batch on the device (``batched.py``).

        Slots to rebuild are replayed as one batch per replay plan, the composition they were
        first computed in when the worker kept its slots: the same round-off as the lost state
        (bitwise on the CPU); across another grouping it agrees to round-off.
        """
        steps = {item.step for item in work}
        if len(steps) != 1:
            raise ValueError(f"a batched call computes one meta-step, got steps {sorted(steps)}")
        (step,) = steps
        # Batched workers run truncated BPTT only (RunConfig refuses PES with them).
        trajectories: dict[int, Trajectory | None] = {}
        for item in work:
            held = self._trajectories.get(item.slot)
            assert held is None or isinstance(held, Trajectory)
            trajectories[item.slot] = held
        plans: dict[tuple[int, ...], list[SlotWork]] = {}
        for item in work:
            if item.rebuild is not None:
                plans.setdefault(item.rebuild.versions, []).append(item)
        for versions, members in plans.items():
            rebuilt = []
            for item in members:
                assert item.rebuild is not None
                first, trajectory = replay_start(
                    self.unroll, replay, slot=item.slot, step=step, rebuild=item.rebuild,
                    state_type=self._state_type,
                )
                rebuilt.append(None if trajectory is None else to_device(trajectory, self.device))
            for replayed_step, used in enumerate(versions, start=first):
                outs = slots_work_batched(
                    self.optimizer, self.family, self.unroll, replay[used], self.run_seed,
                    [item.slot for item in members], replayed_step, rebuilt, self.device,
                )
                rebuilt = [out.trajectory for out in outs]
            trajectories.update((item.slot, t) for item, t in zip(members, rebuilt, strict=True))
        start = time.perf_counter()
        assert self._theta is not None
        outs = slots_work_batched(
            self.optimizer, self.family, self.unroll, self._theta, self.run_seed,
            [item.slot for item in work], step, [trajectories[item.slot] for item in work],
            self.device,
        )
        compute_s = (time.perf_counter() - start) / len(work)
        results = []
        for item, out in zip(work, outs, strict=True):
            self._trajectories[item.slot] = out.trajectory
            message = pack_result(
                out, item, self.unroll, run_seed=self.run_seed, version=version,
                faults=self.faults, compute_s=compute_s,
            )
            replayed = 0 if item.rebuild is None else len(item.rebuild.versions)
            results.append(dataclasses.replace(message, replayed=replayed))
        return results

    def trajectory(self, slot: int) -> TrajectoryArrays | None:
        """The state the worker holds for ``slot`` (tests compare replayed and lost states)."""
        held = self._trajectories.get(slot)
        if held is None:
            return None
        if not isinstance(held, Trajectory):
            raise TypeError(f"slot {slot} holds a {type(held).__name__}; see held_state")
        return TrajectoryArrays.from_trajectory(held)

    def held_state(self, slot: int) -> SlotState | None:
        """The state the worker holds for ``slot``, in torch form (any estimator's)."""
        return self._trajectories.get(slot)

    def _stale_fault(self, work: tuple[SlotWork, ...]) -> bool:
        if self.faults is None or self._theta is None:
            return False
        steps = {item.step for item in work} & (self.faults.stale_theta - self._faults_fired)
        self._faults_fired |= steps
        return bool(steps)

