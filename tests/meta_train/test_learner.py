"""The Ray learner on a real local cluster: exactness, worker death, NaN rejection, staleness."""

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
from meta_train.worker import FaultInjection

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


def run_learner(config, *, on_step=None, faults=None, state=None, until=STEPS):
    learner = Learner(config, faults=faults, state=state)
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
        # of 3): its replacement must get the slots' state from the learner.
        if report.step == 3:
            pid = learner.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    theta, reports, learner = run_learner(with_workers(2), on_step=kill_mid_trajectory)
    assert killed
    assert learner.worker_restarts == 1
    assert reports[-1].worker_restarts == 1
    assert np.array_equal(theta, reference)


def test_exact_resume_from_learner_state(ray_address, reference):
    _, _, first = run_learner(with_workers(2), until=4)  # stops mid-trajectory
    state = first.state()
    assert state.step == 4 and all(t is not None for t in state.trajectories)
    theta, reports, _ = run_learner(with_workers(1), state=state)
    assert [r.step for r in reports] == [4, 5, 6]
    assert np.array_equal(theta, reference)


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


def test_bounded_staleness_lets_workers_run_ahead(ray_address):
    config = with_workers(2, meta_batch=2, staleness=1)
    _, reports, _ = run_learner(config)
    assert [r.step for r in reports] == list(range(STEPS))
    assert all(max(r.staleness) <= 1 for r in reports)  # the bound holds
    # ... and is used: the learner collects one answer at a time, so the worker that answers
    # step k first is given step k + 1 on θ_k before update k exists. A learner that stayed
    # synchronous would report staleness 0 throughout.
    assert max(max(r.staleness) for r in reports) == 1
    assert max(r.metrics()["learner/staleness_max"] for r in reports) == 1


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
