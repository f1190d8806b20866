"""The learner: a plain driver loop over Ray gradient workers (design §3.3, style §6.13).

Schedule (shared with ``training.train_local``): the meta-batch has B *slots*; update k averages
the meta-gradients of every slot at meta-step k, in slot order, then applies clip → Adam to θ.
Slot b is owned by worker ``b % W``, which keeps the slot's trajectory between calls.

Staleness: a worker may start meta-step k with θ of version v only if k − v ≤ S (stale-synchronous
parallel). S = 0 is the synchronous barrier: every gradient of update k is computed with θ_k, so
the final θ is bitwise the one ``train_local`` gives, whatever W is. With S > 0, fast workers run
up to S steps ahead; each update still averages exactly the B gradients of its meta-step, whose
staleness is at most S by construction (logged per update).

A gradient that arrives more than S versions behind its meta-step (an out-of-date worker) is
rejected, counted (``learner/stale_rejected_total``) and its slot recomputed with the current θ.

Traffic is O(θ) per slot and update, whatever the optimizee: workers keep their slots'
trajectories (O(p·J)) and send back only meta-gradients (or PES estimates) and a few numbers.
The learner keeps, per slot, the θ version each meta-step of the current trajectory used, and
the θs of those versions (at most K + S of them, K the longest trajectory's truncations). That
is enough to rebuild any trajectory exactly. Where each slot's trajectories begin is the run's
``schedule.TrajectorySchedule`` (the same K for all with fixed horizons, drawn per slot and
trajectory with log-uniform ones), which the learner and the workers derive alike.

Faults are data: a call that raises ``RayActorError`` or outlives ``call_timeout_s`` means a dead
worker, which is killed and replaced; the replacement rebuilds its slots' trajectories by
replaying their truncations since the trajectory's start with the recorded θ versions
(``worker.rebuild_trajectory``, at most K − 1 truncations), so redone work is exactly the lost
work. A resumed learner rebuilds the same way. An exception raised by the computation itself is
a bug, not a fault: it stops the run. Non-finite meta-gradients are rejected and counted, never
zeroed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from .meta_update import adam_arrays, init_meta_state, meta_update, trainable_mask
from .run_config import RunConfig
from .training import init_theta_flat
from .worker import (
    FaultInjection,
    GradientWorker,
    Rebuild,
    SlotResult,
    SlotWork,
    TrajectoryArrays,
    WorkerResult,
)

# Metric keys of one meta-update (flat constants, style §6.11).
META_LOSS = "meta/loss"
META_GRAD_NORM = "meta/grad_norm"
ACCEPTED = "learner/accepted_grads"
REJECTED = "learner/rejected_grads"
REJECTED_TOTAL = "learner/rejected_grads_total"
STALENESS_MEAN = "learner/staleness_mean"
STALENESS_MAX = "learner/staleness_max"
STALE = "learner/stale_grads"
STALE_REJECTED_TOTAL = "learner/stale_rejected_total"
WORKER_RESTARTS = "learner/worker_restarts"
INNER_STEPS_PER_S = "throughput/inner_steps_per_s"
STEP_SECONDS = "time/step_s"
WORKER_COMPUTE_SECONDS = "time/worker_compute_s"


class WorkerError(RuntimeError):
    """The workers cannot go on: start failure, a bug in the computation, too many restarts."""


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one meta-update did; ``metrics()`` gives the MLflow metrics."""

    step: int  # the meta-step k whose gradients were applied (θ_k → θ_{k+1})
    meta_loss: float  # mean over the B slots (as train_local)
    grad_norm: float  # norm of the averaged gradient before clipping; nan if none accepted
    accepted: int
    rejected: int
    rejected_total: int
    staleness: tuple[int, ...]  # per accepted-or-not gradient: k − version it used
    inner_steps: int  # optimizee steps this update consumed (B × truncation)
    wall_s: float  # wall time since the previous update
    worker_compute_s: float  # sum of the slots' compute time
    worker_restarts: int  # cumulative
    stale_rejected_total: int = 0  # gradients beyond the staleness bound, cumulative

    @property
    def inner_steps_per_s(self) -> float:
        return self.inner_steps / self.wall_s if self.wall_s > 0 else math.nan

    def metrics(self) -> dict[str, float]:
        return {
            META_LOSS: self.meta_loss,
            META_GRAD_NORM: self.grad_norm,
            ACCEPTED: float(self.accepted),
            REJECTED: float(self.rejected),
            REJECTED_TOTAL: float(self.rejected_total),
            STALENESS_MEAN: float(np.mean(self.staleness)),
            STALENESS_MAX: float(max(self.staleness)),
            STALE: float(sum(s > 0 for s in self.staleness)),
            WORKER_RESTARTS: float(self.worker_restarts),
            STALE_REJECTED_TOTAL: float(self.stale_rejected_total),
            INNER_STEPS_PER_S: self.inner_steps_per_s,
            STEP_SECONDS: self.wall_s,
            WORKER_COMPUTE_SECONDS: self.worker_compute_s,
        }


@dataclasses.dataclass(frozen=True)
class LearnerState:
    """Everything exact resume needs from the learner (see ``checkpoint.py``).

    Slot b's trajectory at the start of ``step`` is rebuilt by replaying the meta-steps since
    its replay base with θ of ``versions[b]``: the base is the trajectory's start when
    ``trajectories[b]`` is None (every run writes that), else that stored state (read from a
    format-1 checkpoint, kept until its trajectory ends). No O(p·J) state is needed otherwise.
    """

    step: int  # meta-updates applied: θ is θ_step
    theta: np.ndarray  # flat float32
    adam: dict[str, np.ndarray]  # torch Adam's per-parameter state (step, exp_avg, exp_avg_sq)
    trajectories: tuple[TrajectoryArrays | None, ...]  # each slot's replay base (None: its start)
    rejected_total: int = 0
    worker_restarts: int = 0
    # Per slot, the θ version each meta-step since its replay base used (() for every slot: none).
    versions: tuple[tuple[int, ...], ...] = ()
    theta_history: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    stale_rejected_total: int = 0

    def slot_versions(self) -> tuple[tuple[int, ...], ...]:
        return self.versions or ((),) * len(self.trajectories)


@dataclasses.dataclass
class Traffic:
    """Bytes between the learner and its workers, as pickled (what Ray serialises).

    ``to_learner`` counts every answer; ``from_learner`` every call's arguments plus θ once per
    worker and version (each worker reads the version's object once).
    """

    to_learner: int = 0
    from_learner: int = 0
    answers: int = 0
    calls: int = 0


def check_state(config: RunConfig, state: LearnerState) -> None:
    """Refuses a state that ``config``'s learner cannot continue (e.g. a checkpoint whose file
    verifies but whose θ or slots belong to another optimizer or meta-batch).

    Raises:
      ValueError: a slot count other than ``config.meta_batch``, a θ of another shape than the
        optimizer's, a θ with non-finite values (every meta-gradient would be rejected), or
        replay records that cannot rebuild every slot's trajectory at the state's step.
    """
    if len(state.trajectories) != config.meta_batch:
        raise ValueError(
            f"the state has {len(state.trajectories)} slots, the config's meta_batch is "
            f"{config.meta_batch}"
        )
    optimizer = config.make_optimizer()
    expected = (optimizer.num_meta_parameters(),)
    if np.shape(state.theta) != expected:
        raise ValueError(
            f"the state's θ has shape {np.shape(state.theta)}, {optimizer.name} needs {expected}"
        )
    if not np.all(np.isfinite(state.theta)):
        raise ValueError(
            f"the state's θ has {int(np.sum(~np.isfinite(state.theta)))} non-finite values"
        )
    _check_replay_records(state, config)


@dataclasses.dataclass
class _Worker:
    index: int
    slots: tuple[int, ...]
    actor: Any
    next_step: int
    held: dict[int, int] = dataclasses.field(default_factory=dict)  # slot → step it holds
    inflight: Any = None  # ObjectRef of the running call
    inflight_version: int = 0  # the θ version the running call was given
    submitted_at: float = 0.0
    pid: int | None = None
    theta_version: int | None = None  # the last θ version sent (traffic accounting)


class Learner:
    """Drives the workers and owns θ and its Adam state.

    ``wait_s`` is the wall time spent blocked on the workers (``ray.wait``); everything else a
    ``run`` takes is the learner's own work (``benchmarks/bench_scale.py`` measures it).

    Args:
      config: a resolved ``RunConfig`` (``workers`` and ``meta_batch`` set).
      state: where to continue from (a checkpoint); None starts from θ_0.
      data_dir: dataset folder given to the workers.
      faults: test-only fault injection for the workers.
      poll_s: ``ray.wait`` timeout of one loop turn (how often call deadlines are checked).
      worker_resources: Ray resources of one worker actor (default one CPU, and one GPU for
        ``device = "cuda"``); benchmarks that pack many light workers on one machine give
        fractions.
    """

    worker_class: type = GradientWorker  # the actor class (a benchmark may use a stand-in)

    def __init__(
        self,
        config: RunConfig,
        *,
        state: LearnerState | None = None,
        data_dir: str | Path | None = None,
        faults: FaultInjection | None = None,
        poll_s: float = 0.5,
        worker_resources: dict[str, float] | None = None,
    ) -> None:
        if not config.resolved:
            raise ValueError("the learner needs a resolved config (workers and meta_batch set)")
        self.config = config
        self.data_dir = None if data_dir is None else str(data_dir)
        self.faults = faults
        self.poll_s = poll_s
        self.worker_resources = dict(worker_resources or default_worker_resources(config))
        self.start_timeout_s = config.worker_start_timeout_s
        self.meta_batch: int = config.meta_batch  # type: ignore[assignment]
        self.num_workers: int = config.workers  # type: ignore[assignment]
        self.schedule = config.make_schedule()
        optimizer = config.make_optimizer()
        self._trainable = trainable_mask(optimizer, config.experimental.frozen)
        if state is None:
            theta = init_theta_flat(optimizer, config.seed, config.init, config.experimental)
            state = LearnerState(0, theta.numpy(), {}, (None,) * self.meta_batch)
        check_state(config, state)
        self._meta = init_meta_state(torch.tensor(state.theta), step=state.step, adam=state.adam)
        # What rebuilds every slot's trajectory: its replay base (None: the trajectory's start),
        # the θ version of each meta-step since, and the θs of every version still needed.
        self._bases: list[TrajectoryArrays | None] = list(state.trajectories)
        self._versions: list[list[int]] = [list(v) for v in state.slot_versions()]
        self._thetas: dict[int, np.ndarray] = {
            int(v): np.asarray(t, dtype=np.float32) for v, t in state.theta_history.items()
        }
        self.rejected_total = state.rejected_total
        self.stale_rejected_total = state.stale_rejected_total
        self.worker_restarts = state.worker_restarts
        self.traffic = Traffic()
        self.wait_s = 0.0
        self._results: dict[tuple[int, int], SlotResult] = {}
        self._workers: list[_Worker] = []
        self._owners: dict[Any, _Worker] = {}  # in-flight call → its worker
        self._theta_ref: Any = None
        self._last_update = time.perf_counter()

    # -- public surface ---------------------------------------------------------------------

    def start(self) -> None:
        """Creates the workers and waits until each has built its task family."""
        self._remote_cls: Any = ray.remote(self.worker_class).options(
            max_restarts=0, max_task_retries=0, **self.worker_resources
        )
        for i in range(self.num_workers):
            slots = tuple(range(i, self.meta_batch, self.num_workers))
            self._workers.append(_Worker(i, slots, self._new_actor(i), self.step))
        pings = [w.actor.ping.remote() for w in self._workers]
        try:
            pids = ray.get(pings, timeout=self.start_timeout_s)
        except GetTimeoutError:
            have = ray.cluster_resources()
            needs = ", ".join(
                f"{amount:g} {name.removeprefix('num_').removesuffix('s').upper()}"
                for name, amount in self.worker_resources.items()
            )
            cluster = ", ".join(f"{have.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
            raise WorkerError(
                f"{self.num_workers} workers did not start within {self.start_timeout_s:.0f} s; "
                f"each needs {needs} and the Ray cluster has {cluster}"
            ) from None
        except RayActorError as error:
            raise WorkerError(f"a worker failed to start: {_cause(error)}") from None
        for w, pid in zip(self._workers, pids, strict=True):
            w.pid = pid
        self._put_theta()
        self._last_update = time.perf_counter()

    def run(
        self,
        until: int,
        on_step: Callable[[StepReport], None] | None = None,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Runs meta-updates until ``self.step == until`` or ``should_stop()`` turns true.

        ``on_step`` runs after each update. The next meta-step is already submitted then, so
        slow callbacks (validation, checkpoints) overlap with the workers' computation. A stop
        leaves the committed state (``state()``) consistent: in-flight work is abandoned.
        """
        if not self._workers:
            self.start()
        while self.step < until and not (should_stop is not None and should_stop()):
            self._submit_ready(until)
            inflight = [w.inflight for w in self._workers if w.inflight is not None]
            if not inflight:
                raise RuntimeError(f"learner stalled at step {self.step}: no work in flight")
            self._collect_all(self._wait_ready(inflight))
            self._check_deadlines()
            while self.step < until and self._step_complete():
                if should_stop is not None and should_stop():
                    return
                report = self._apply_update()
                self._submit_ready(until)
                if on_step is not None:
                    on_step(report)

    def _wait_ready(self, inflight: list[Any]) -> list[Any]:
        """Every finished call, blocking (up to ``poll_s``) only while none has finished.

        Taking all that are ready at once keeps the learner's loop turns per update far below
        one per worker. Synchronously (S = 0) nothing can be submitted before every call has
        answered, so the blocking wait is for all of them.
        """
        ready, _ = ray.wait(inflight, num_returns=len(inflight), timeout=0)
        if not ready:
            wanted = len(inflight) if self.config.staleness == 0 else 1
            waited = time.perf_counter()
            ready, _ = ray.wait(inflight, num_returns=wanted, timeout=self.poll_s)
            self.wait_s += time.perf_counter() - waited
        return ready

    def state(self) -> LearnerState:
        """The committed state: θ_step, Adam, and what rebuilds every slot at ``step``."""
        used = {v for versions in self._versions for v in versions}
        return LearnerState(
            step=self.step,
            theta=self.theta_numpy(),
            adam=adam_arrays(self._meta),
            trajectories=tuple(self._bases),
            rejected_total=self.rejected_total,
            worker_restarts=self.worker_restarts,
            versions=tuple(tuple(v) for v in self._versions),
            theta_history={v: self._thetas[v].copy() for v in sorted(used)},
            stale_rejected_total=self.stale_rejected_total,
        )

    @property
    def step(self) -> int:
        """Meta-updates applied: θ is θ_step."""
        return self._meta.step

    @property
    def theta(self) -> torch.Tensor:
        return self._meta.theta

    def theta_numpy(self) -> np.ndarray:
        return self.theta.numpy().copy()

    def worker_pids(self) -> list[int | None]:
        """Process ids of the workers (as last reported; None for a fresh replacement)."""
        return [w.pid for w in self._workers]

    def close(self) -> None:
        """Kills the workers (their CPUs return to the cluster)."""
        for w in self._workers:
            _kill(w.actor)
        self._workers.clear()
        self._results.clear()
        self._owners.clear()
        self._theta_ref = None

    # -- scheduling -------------------------------------------------------------------------

    def _new_actor(self, index: int) -> Any:
        return self._remote_cls.remote(index, self.config, self.data_dir, self.faults)

    def _put_theta(self) -> None:
        # θ is sent once per version; every call of that version passes the same reference.
        theta = self.theta_numpy()
        self._thetas[self.step] = theta
        self._theta_ref = ray.put(theta)
        self._forget_unneeded_thetas()

    def _forget_unneeded_thetas(self) -> None:
        """Drops θs older than every version a rebuild may still replay with."""
        live = [v for versions in self._versions for v in versions]
        live += [r.version for r in self._results.values()]
        live += [w.inflight_version for w in self._workers if w.inflight is not None]
        oldest = min(live, default=self.step)
        for version in [v for v in self._thetas if v < oldest]:
            del self._thetas[version]

    def _submit_ready(self, until: int) -> None:
        for w in self._workers:
            k = w.next_step
            if w.inflight is None and k < until and k - self.step <= self.config.staleness:
                self._submit(w)

    def _submit(self, w: _Worker) -> None:
        k = w.next_step
        items: list[SlotWork] = []
        replay_thetas: dict[int, np.ndarray] = {}
        for slot in w.slots:
            rebuild = None
            if self.schedule.position(slot, k).truncation and w.held.get(slot) != k - 1:
                # The worker lacks the slot's state (it is new): it replays the trajectory.
                rebuild = self._rebuild(slot, k)
                replay_thetas.update((v, self._thetas[v]) for v in rebuild.versions)
            items.append(SlotWork(slot, k, rebuild))
        args: tuple[Any, ...] = (self.step, tuple(items))
        if replay_thetas:
            args += (replay_thetas,)
        w.inflight = w.actor.compute.remote(self._theta_ref, *args)
        self._owners[w.inflight] = w
        w.inflight_version = self.step
        w.submitted_at = time.monotonic()
        self.traffic.calls += 1
        self.traffic.from_learner += len(pickle.dumps(args, protocol=5))
        if w.theta_version != self.step:
            self.traffic.from_learner += self._thetas[self.step].nbytes
            w.theta_version = self.step

    def _rebuild(self, slot: int, step: int) -> Rebuild:
        """What rebuilds ``slot``'s state at the start of ``step`` (``step`` ≥ ``self.step``).

        The meta-steps of the trajectory before ``self.step`` are in the slot's records; those
        from ``self.step`` on are buffered results, which say which θ version they used.
        """
        start = step - self.schedule.position(slot, step).truncation
        base, versions = None, []
        if start <= self.step:  # the trajectory began before the committed step (or at it)
            base, versions = self._bases[slot], list(self._versions[slot])
        versions += [self._results[(j, slot)].version for j in range(max(start, self.step), step)]
        return Rebuild(tuple(versions), base)

    def _collect_all(self, refs: list[Any]) -> None:
        """Takes the answers of finished calls: one ``ray.get`` for all, unless one failed."""
        if not refs:
            return
        try:
            answers = ray.get(refs, timeout=self.config.call_timeout_s)
        except (RayActorError, GetTimeoutError, RayTaskError):
            for ref in refs:  # one by one: the failed call is handled as what it is
                self._collect(ref)
            return
        for ref, answer in zip(refs, answers, strict=True):
            self._accept(self._owners.pop(ref), answer)

    def _collect(self, ref: Any) -> None:
        w = self._owners.pop(ref)
        try:
            answer = ray.get(ref, timeout=self.config.call_timeout_s)
        except RayActorError as error:
            if getattr(error, "actor_init_failed", False):
                raise WorkerError(f"worker {w.index} failed to start: {_cause(error)}") from None
            self._replace(w, f"died ({type(error).__name__})")
            return
        except GetTimeoutError:
            self._replace(w, "timed out fetching its result")
            return
        except RayTaskError as error:
            raise WorkerError(
                f"worker {w.index} failed at step {w.next_step}: {_cause(error)}"
            ) from None
        self._accept(w, answer)

    def _accept(self, w: _Worker, answer: WorkerResult) -> None:
        self.traffic.answers += 1
        self.traffic.to_learner += len(pickle.dumps(answer, protocol=5))
        w.pid = answer.pid
        w.inflight = None
        if self._reject_stale(w, answer):
            return
        for result in answer.results:
            self._results[(result.step, result.slot)] = result
            w.held[result.slot] = result.step
        w.next_step += 1

    def _reject_stale(self, w: _Worker, answer: WorkerResult) -> bool:
        """Rejects an answer with a gradient beyond the staleness bound; the step is redone.

        The worker's state advanced with that θ, so its slots are rebuilt from the records.
        """
        stale = [r for r in answer.results if r.step - r.version > self.config.staleness]
        if not stale:
            return False
        self.stale_rejected_total += len(stale)
        for result in answer.results:
            w.held.pop(result.slot, None)
        return True

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.inflight is not None and now - w.submitted_at > self.config.call_timeout_s:
                self._replace(w, f"exceeded the call timeout of {self.config.call_timeout_s} s")

    def _replace(self, w: _Worker, reason: str) -> None:
        self.worker_restarts += 1
        if self.worker_restarts > self.config.max_worker_restarts:
            raise WorkerError(
                f"worker {w.index} {reason}; {self.worker_restarts} restarts exceed "
                f"max_worker_restarts = {self.config.max_worker_restarts}"
            )
        _kill(w.actor)
        w.actor = self._new_actor(w.index)
        w.held.clear()
        self._owners.pop(w.inflight, None)
        w.inflight = None
        w.pid = None

    # -- the update -------------------------------------------------------------------------

    def _step_complete(self) -> bool:
        return all((self.step, b) in self._results for b in range(self.meta_batch))

    def _apply_update(self) -> StepReport:
        k = self.step
        results = [self._results.pop((k, b)) for b in range(self.meta_batch)]
        # The update train_local applies too (meta_update: reject, average, clip, Adam).
        self._meta, update = meta_update(
            self._meta,
            # Copied: Ray hands results back as read-only views of its object store, which
            # torch.from_numpy would wrap writable (undefined behaviour, and a warning per run).
            [torch.tensor(np.asarray(r.meta_grad)) for r in results],
            self.config.meta_optim,
            self.config.experimental,
            self._trainable,
        )
        self.rejected_total += update.rejected
        self._record_versions(k, results)
        self._put_theta()
        now = time.perf_counter()
        wall, self._last_update = now - self._last_update, now
        return StepReport(
            step=k,
            meta_loss=sum(r.meta_loss for r in results) / len(results),
            grad_norm=update.grad_norm,
            accepted=update.accepted,
            rejected=update.rejected,
            rejected_total=self.rejected_total,
            staleness=tuple(k - r.version for r in results),
            inner_steps=self.meta_batch * self.config.unroll.truncation * self._per_slot,
            wall_s=wall,
            worker_compute_s=sum(r.compute_s for r in results),
            worker_restarts=self.worker_restarts,
            stale_rejected_total=self.stale_rejected_total,
        )

    @property
    def _per_slot(self) -> int:
        """Inner trajectories a slot advances per meta-step (PES: two per antithetic pair)."""
        estimator = self.config.experimental.estimator
        return 2 * estimator.pairs if estimator.kind == "pes" else 1

    def _record_versions(self, step: int, results: list[SlotResult]) -> None:
        """Notes the θ version each slot used at ``step``; a new trajectory starts afresh."""
        for slot, result in enumerate(results):
            if self.schedule.position(slot, step).last:
                self._versions[slot] = []
                self._bases[slot] = None
            else:
                self._versions[slot].append(result.version)


def default_worker_resources(config: RunConfig) -> dict[str, float]:
    """One CPU per worker, and one GPU for ``device = "cuda"`` (Ray ``num_gpus``)."""
    resources = {"num_cpus": 1.0}
    if config.device == "cuda":
        resources["num_gpus"] = 1.0
    return resources


def _check_replay_records(state: LearnerState, config: RunConfig) -> None:
    """Refuses a state whose records cannot rebuild every slot's trajectory at its step."""
    unroll = config.unroll
    schedule = config.make_schedule()
    versions = state.slot_versions()
    if len(versions) != len(state.trajectories):
        raise ValueError(
            f"state records θ versions for {len(versions)} slots, has {len(state.trajectories)}"
        )
    for slot, (base, used) in enumerate(zip(state.trajectories, versions, strict=True)):
        truncation_index = schedule.position(slot, state.step).truncation
        if base is not None and config.experimental.estimator.kind != "tbptt":
            raise ValueError(
                f"state slot {slot} stores a trajectory (a format-1 checkpoint): it can "
                f"continue with truncated BPTT only, not {config.experimental.estimator.kind}"
            )
        since = 0 if base is None else base.step // unroll.truncation
        if len(used) != truncation_index - since:
            raise ValueError(
                f"state slot {slot} records {len(used)} θ versions since its replay base; "
                f"rebuilding its trajectory at step {state.step} needs {truncation_index - since}"
            )
        missing = sorted(set(used) - set(state.theta_history))
        if missing:
            raise ValueError(f"state slot {slot} replays θ versions {missing} it does not hold")


def _kill(actor: Any) -> None:
    # Already dead, or gone with its node: nothing to do.
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)


def _cause(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
