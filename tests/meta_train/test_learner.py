"""The Ray learner on a real local cluster: exactness, worker death, NaN rejection, staleness,
O(θ) traffic."""

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch

from meta_train.experimental import ExperimentalConfig
from meta_train.learner import Learner, WorkerError
from meta_train.run_config import build_config
from meta_train.training import init_theta_flat, slot_work, train_local
from meta_train.unroll import start_trajectory
from meta_train.worker import FaultInjection, TrajectoryArrays

pytestmark = pytest.mark.slow  # a real Ray cluster and workers: minutes on 2 CPUs

STEPS = 7  # crosses two trajectory boundaries: 3 truncations per trajectory
CONFIG = build_config(
    {
        "task": "quadratic",
        "num_candidates": 4,
        "meta_batch": 3,
        "steps": STEPS,
        "unroll": {"horizon": 6, "truncation": 2},
        "validation": {"every": 0},
    }
)


def with_workers(workers, **changes):
    return dataclasses.replace(CONFIG, workers=workers, **changes)


def local_theta(config):
    """θ after STEPS updates of the single-process loop under ``config``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count, so reductions run in the same order
    try:
        theta, _ = train_local(
            config.make_optimizer(),
            config.make_family(),
            steps=STEPS,
            run_seed=config.seed,
            unroll=config.unroll,
            meta_optim=config.meta_optim,
            meta_batch=config.meta_batch,
            experimental=config.experimental,
        )
    finally:
        torch.set_num_threads(previous)
    return theta.numpy()


@pytest.fixture(scope="module")
def reference():
    """θ after STEPS updates of the single-process loop."""
    return local_theta(CONFIG)


def run_learner(config, *, on_step=None, faults=None, state=None, until=STEPS, **kwargs):
    learner = Learner(config, faults=faults, state=state, **kwargs)
    reports = []
    try:
        learner.start()

        def record(report):
            reports.append(report)
            if on_step is not None:
                on_step(learner, report)

        learner.run(until, record)
        return learner.theta_numpy(), reports, learner
    finally:
        learner.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_synchronous_theta_is_bitwise_train_locals_for_any_worker_count(
    ray_address, reference, workers
):
    theta, reports, learner = run_learner(with_workers(workers))
    assert np.array_equal(theta, reference)
    assert [r.step for r in reports] == list(range(STEPS))
    assert all(r.staleness == (0, 0, 0) and r.accepted == 3 for r in reports)
    assert learner.worker_restarts == 0


def test_frozen_theta_entries_stay_put_in_the_learner_as_in_train_local(ray_address):
    meta_optim = dataclasses.replace(CONFIG.meta_optim, lr=1e-3)
    config = with_workers(
        1, meta_optim=meta_optim, experimental=ExperimentalConfig(frozen=("weight_bias",))
    )
    theta, _, _ = run_learner(config)
    assert np.array_equal(theta, local_theta(config))
    optimizer = config.make_optimizer()
    start = optimizer.unflatten(
        init_theta_flat(optimizer, config.seed, config.init, config.experimental)
    )
    after = optimizer.unflatten(torch.from_numpy(theta))
    assert torch.equal(after["weight_bias"], start["weight_bias"])
    assert not torch.equal(after["weight_kernel"], start["weight_kernel"])


def test_a_meta_lr_schedule_runs_the_same_in_the_learner(ray_address):
    meta_optim = dataclasses.replace(CONFIG.meta_optim, lr=1e-3)
    config = with_workers(
        1, meta_optim=meta_optim, experimental=ExperimentalConfig(meta_lr_half_life=2.0)
    )
    theta, _, _ = run_learner(config)
    assert np.array_equal(theta, local_theta(config))


def test_sigkill_of_a_worker_mid_run_is_redone_exactly(ray_address, reference):
    killed = []

    def kill_mid_trajectory(learner, report):
        # After update 3 the next step (4) is already running, mid-trajectory (truncation 2
        # of 3): its replacement must rebuild the slots' state by replaying step 3.
        if report.step == 3:
            pid = learner.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    theta, reports, learner = run_learner(with_workers(2), on_step=kill_mid_trajectory)
    assert killed
    assert learner.worker_restarts == 1
    assert reports[-1].worker_restarts == 1
    assert np.array_equal(theta, reference)
    assert learner.traffic.to_learner < 10 * STEPS * CONFIG.meta_batch * theta.nbytes


def test_exact_resume_holds_no_trajectory_only_theta_versions(ray_address, reference):
    _, _, first = run_learner(with_workers(2), until=4)  # stops mid-trajectory
    state = first.state()
    # Step 4 is truncation 1 of trajectory 1 (steps 3, 4, 5): step 3's θ rebuilds it.
    assert state.step == 4 and state.trajectories == (None, None, None)
    assert state.versions == ((3,), (3,), (3,)) and list(state.theta_history) == [3]
    theta, reports, _ = run_learner(with_workers(1), state=state)
    assert [r.step for r in reports] == [4, 5, 6]
    assert np.array_equal(theta, reference)


def test_a_state_with_stored_trajectories_resumes_exactly(ray_address, reference):
    """A format-1 checkpoint stored every slot's trajectory: they are the replay bases."""
    _, _, first = run_learner(with_workers(1), until=5)
    optimizer, family = CONFIG.make_optimizer(), CONFIG.make_family()
    replay = first.state()
    bases = []
    for slot in range(CONFIG.meta_batch):
        trajectory = None
        for step, version in zip((3, 4), replay.versions[slot], strict=True):
            theta = torch.tensor(replay.theta_history[version])
            trajectory = slot_work(
                optimizer, family, CONFIG.unroll, theta, 0, slot, step, trajectory
            ).trajectory
        bases.append(TrajectoryArrays.from_trajectory(trajectory))
    state = dataclasses.replace(replay, trajectories=tuple(bases), versions=(), theta_history={})
    seen = {}

    def kill_once(learner, report):  # a lost worker must rebuild from the stored base
        if report.step == 5 and not seen:
            seen["state"] = learner.state()
            os.kill(learner.worker_pids()[0], signal.SIGKILL)

    theta, reports, learner = run_learner(with_workers(2), state=state, on_step=kill_once)
    assert [r.step for r in reports] == [5, 6]
    assert np.array_equal(theta, reference)
    assert learner.worker_restarts == 1
    assert seen["state"].trajectories == (None, None, None)  # the trajectory ended: bases gone


def test_a_state_that_cannot_rebuild_its_trajectories_is_refused(ray_address):
    _, _, first = run_learner(with_workers(1), until=4)
    state = first.state()
    with pytest.raises(ValueError, match="records 0 θ versions since its replay base; "
                                         "rebuilding its trajectory at step 4 needs 1"):
        Learner(with_workers(1), state=dataclasses.replace(state, versions=((), (), ())))
    with pytest.raises(ValueError, match=r"replays θ versions \[3\] it does not hold"):
        Learner(with_workers(1), state=dataclasses.replace(state, theta_history={}))


def test_bytes_to_the_learner_are_o_theta_not_o_p_times_j(ray_address):
    """HyperAdam (J = 20) on a 2 000-dimensional quadratic: a trajectory is ~40 θs."""
    config = dataclasses.replace(
        build_config(
            {
                "task": "quadratic",
                "family": {"dim": 2000},
                "meta_batch": 2,
                "steps": 4,
                "unroll": {"horizon": 6, "truncation": 2},
                "validation": {"every": 0},
            }
        ),
        workers=2,
    )
    theta, _, learner = run_learner(config, until=4)
    optimizer, family = config.make_optimizer(), config.make_family()
    task = family.build(family.sample(0))
    trajectory = TrajectoryArrays.from_trajectory(
        start_trajectory(optimizer, task, 0)
    )
    assert trajectory.nbytes > 40 * theta.nbytes  # O(p·J) would be unmistakable
    per_update = learner.traffic.to_learner / 4
    assert theta.nbytes * config.meta_batch < per_update
    assert per_update <= 1.25 * theta.nbytes * config.meta_batch
    assert learner.traffic.answers == 4 * 2
    # From the learner: θ once per worker and version, and the calls' bookkeeping.
    sent = learner.traffic.from_learner / 4
    assert 2 * theta.nbytes < sent <= 1.25 * 2 * theta.nbytes


def test_nan_gradients_are_rejected_counted_and_leave_theta_alone(ray_address):
    config = with_workers(2, meta_batch=2)
    faults = FaultInjection(frozenset({(1, 1), (2, 0), (2, 1)}))
    thetas = {}

    def snapshot(learner, report):
        thetas[report.step] = learner.theta_numpy()

    _, reports, learner = run_learner(config, faults=faults, on_step=snapshot, until=3)
    assert [(r.accepted, r.rejected) for r in reports] == [(2, 0), (1, 1), (0, 2)]
    assert reports[-1].rejected_total == 3 == learner.rejected_total
    assert np.isnan(reports[2].grad_norm)
    assert np.array_equal(thetas[2], thetas[1])  # every gradient rejected: no Adam step

    # Step 1 averaged slot 0's gradient alone: replay the loop by hand, with torch's Adam.
    optimizer, family = config.make_optimizer(), config.make_family()
    theta = init_theta_flat(optimizer, config.seed).clone().requires_grad_(True)
    meta = config.meta_optim
    meta_opt = torch.optim.Adam([theta], lr=meta.lr, betas=(meta.beta1, meta.beta2), eps=meta.eps)
    trajectories = [None, None]
    for step, slots in ((0, (0, 1)), (1, (0,))):
        grads = []
        for slot in range(2):
            out = slot_work(
                optimizer, family, config.unroll, theta.detach(), 0, slot, step,
                trajectories[slot],
            )
            trajectories[slot] = out.trajectory
            if slot in slots:
                grads.append(out.meta_grad)
        theta.grad = torch.stack(grads).mean(dim=0)
        meta_opt.step()
    assert np.array_equal(thetas[1], theta.detach().numpy())


def test_bounded_staleness_lets_a_fast_worker_run_ahead_of_a_slow_one(ray_address):
    """Worker 0 sleeps 0.3 s per call: worker 1 starts step k + 1 before θ_k+1 exists."""
    config = with_workers(2, meta_batch=2, staleness=1)
    faults = FaultInjection(slow_workers=frozenset({0}), delay_s=0.3)
    _, reports, learner = run_learner(config, faults=faults)
    assert [r.step for r in reports] == list(range(STEPS))
    slow, fast = zip(*(r.staleness for r in reports), strict=True)
    assert set(slow) == {0}  # the slow worker always has the newest θ
    assert set(fast) == {0, 1} and fast.count(1) >= STEPS - 2  # the fast one runs ahead
    assert all(r.accepted == 2 for r in reports) and learner.stale_rejected_total == 0
    metrics = reports[-1].metrics()
    assert metrics["learner/staleness_max"] == 1 and metrics["learner/stale_grads"] == 1


def test_a_gradient_beyond_the_staleness_bound_is_rejected_counted_and_redone(
    ray_address, reference
):
    """Each worker computes step 4 once with the θ it cached (version 3): beyond S = 0."""
    faults = FaultInjection(stale_theta=frozenset({4}))
    theta, reports, learner = run_learner(with_workers(2), faults=faults)
    assert learner.stale_rejected_total == 3  # the three slots, once each
    assert reports[-1].metrics()["learner/stale_rejected_total"] == 3
    assert all(r.staleness == (0, 0, 0) for r in reports)
    assert np.array_equal(theta, reference)  # the redone step rebuilt the slots exactly


def test_a_worker_that_cannot_start_is_a_clear_error(ray_address, tmp_path):
    config = dataclasses.replace(
        build_config({"meta_batch": 1, "validation": {"every": 0}}), workers=1
    )
    learner = Learner(config, data_dir=tmp_path / "no-mnist-here")
    try:
        with pytest.raises(WorkerError, match="a worker failed to start: FileNotFoundError"):
            learner.start()
    finally:
        learner.close()


def test_a_format_1_checkpoint_of_the_repository_continues_exactly(ray_address):
    """The shipped HyperAdam run's checkpoint stored its slot at step 8774, truncation 5 of 5
    (inner step 80): the learner sends that state as the slot's replay base and continues
    exactly as the old format's path (the stored trajectory continued in place) would."""
    from pathlib import Path

    from meta_train import checkpoint as ckpt
    from meta_train.meta_update import init_meta_state, meta_update
    from meta_train.run_config import RunConfig

    kept = ckpt.load(Path(__file__).parents[2] / "checkpoints" / "hyperadam-seed0-step8774.ckpt")
    config = dataclasses.replace(RunConfig.from_dict(kept.config), workers=1)
    state = kept.learner
    assert state.versions == () and state.trajectories[0].step == 80

    theta, reports, learner = run_learner(config, state=state, until=8775)
    assert [r.step for r in reports] == [8774]

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting
    try:
        optimizer, family = config.make_optimizer(), config.make_family()
        trajectory = state.trajectories[0].to_trajectory(type(optimizer.init_state(1)))
        out = slot_work(optimizer, family, config.unroll, torch.tensor(state.theta),
                        config.seed, 0, 8774, trajectory)
        meta = init_meta_state(torch.tensor(state.theta), step=8774, adam=state.adam)
        meta, _ = meta_update(meta, [out.meta_grad], config.meta_optim, config.experimental)
    finally:
        torch.set_num_threads(previous)
    assert np.array_equal(theta, meta.theta.numpy())
    assert learner.state().trajectories == (None,)  # the trajectory ended with step 8774
