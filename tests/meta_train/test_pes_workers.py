"""PES on the gradient workers and the Ray learner, with log-uniform horizons and random offsets.

The guarantees of truncated BPTT hold for PES too: a worker sends O(θ), a lost slot's state (its
antithetic pairs and their accumulated perturbations) is rebuilt bitwise by replay, and θ is
bitwise the single-process loop's for 1 or 2 workers, after a SIGKILLed worker, and on resume.
"""

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch

from meta_train.experimental import EstimatorConfig
from meta_train.learner import Learner, LearnerState, check_state
from meta_train.pes import PESState
from meta_train.run_config import build_config
from meta_train.training import init_theta_flat, slot_work, task_seed, train_local
from meta_train.unroll import Trajectory
from meta_train.worker import (
    GradientWorker,
    Rebuild,
    SlotWork,
    TrajectoryArrays,
    rebuild_trajectory,
)

STEPS = 8
CONFIG = build_config(
    {
        "task": "quadratic",
        "num_candidates": 4,
        "family": {"dim": 300},  # a PES slot's state (4 trajectories) is ~120 θs
        "meta_batch": 3,
        "steps": STEPS,
        "unroll": {"horizon": 6, "truncation": 2},
        "meta_optim": {"lr": 1e-2},  # θ versions far enough apart that a wrong one shows
        "validation": {"every": 0},
        "experimental": {
            "estimator": {"kind": "pes", "sigma": 0.1, "pairs": 2},
            # 1 … 6 truncations per trajectory; each slot's first one cut at random.
            "horizons": {"kind": "log_uniform", "min_steps": 2, "max_steps": 12, "offsets": True},
        },
    }
)
TBPTT = dataclasses.replace(
    CONFIG, experimental=dataclasses.replace(CONFIG.experimental, estimator=EstimatorConfig())
)


@pytest.fixture
def parts():
    optimizer = CONFIG.make_optimizer()
    return optimizer, CONFIG.make_family(), init_theta_flat(optimizer, CONFIG.seed)


def test_the_schedule_of_these_tests_has_slots_mid_trajectory_at_different_steps():
    """What the tests below rely on: the slots' trajectories begin at different meta-steps."""
    schedule = CONFIG.make_schedule()
    assert [schedule.position(slot, 5).truncation for slot in range(3)] == [2, 2, 2]
    assert schedule.position(0, 1).truncation == 0 and schedule.position(2, 1).truncation == 1
    assert schedule.position(1, 7).truncation == 4  # a trajectory of 5 truncations
    # Where the learner tests kill and resume, the slots are not where a fixed K = 3 puts them.
    assert [schedule.position(slot, 6).truncation for slot in range(3)] == [0, 3, 3]
    assert [schedule.position(slot, 7).truncation for slot in range(3)] == [1, 4, 0]


def states_equal(a, b) -> bool:
    if isinstance(a, Trajectory):
        return (
            (a.seed, a.step) == (b.seed, b.step)
            and torch.equal(a.params, b.params)
            and all(torch.equal(x, y) for x, y in zip(a.opt_state, b.opt_state, strict=True))
        )
    return len(a.particles) == len(b.particles) and all(
        torch.equal(p.xi, q.xi)
        and states_equal(p.positive, q.positive)
        and states_equal(p.negative, q.negative)
        for p, q in zip(a.particles, b.particles, strict=True)
    )


def test_a_pes_worker_sends_an_o_theta_estimate_and_keeps_its_pairs(parts):
    optimizer, family, theta = parts
    worker = GradientWorker(0, CONFIG)
    schedule = CONFIG.make_schedule()
    reference = {0: None, 2: None}
    for step in range(6):
        answer = worker.compute(theta.numpy(), 0, (SlotWork(0, step), SlotWork(2, step)))
        for message in answer.results:
            expected = slot_work(
                optimizer, family, CONFIG.unroll, theta, 0, message.slot, step,
                reference[message.slot],
                estimator=CONFIG.experimental.estimator, schedule=schedule,
            )  # fmt: skip
            reference[message.slot] = expected.trajectory
            where = schedule.position(message.slot, step)
            assert message.meta_grad.shape == theta.shape and message.meta_grad.dtype == np.float32
            assert np.array_equal(message.meta_grad, expected.meta_grad.numpy())
            assert message.meta_loss == expected.meta_loss and message.finite
            assert message.task_seed == task_seed(0, message.slot, where.trajectory)
            assert message.inner_step == (where.truncation + 1) * CONFIG.unroll.truncation
            held = worker.held_state(message.slot)
            assert isinstance(held, PESState) and len(held.particles) == 2
            assert states_equal(held, expected.trajectory)
    # Not the truncated-BPTT gradient: the estimator really is PES.
    tbptt = slot_work(optimizer, family, CONFIG.unroll, theta, 0, 0, 0, None)
    pes = slot_work(
        optimizer, family, CONFIG.unroll, theta, 0, 0, 0, None,
        estimator=CONFIG.experimental.estimator, schedule=schedule,
    )  # fmt: skip
    assert not torch.equal(tbptt.meta_grad, pes.meta_grad)


def test_a_replayed_pes_state_is_bitwise_the_lost_one_and_needs_the_recorded_thetas(parts):
    """Slot 2 is at truncation 2 of a trajectory that began at step 3: steps 3 and 4 replay."""
    _, _, theta0 = parts
    thetas = {v: (theta0 + 0.01 * v).numpy() for v in range(6)}
    lost = GradientWorker(0, CONFIG)
    for step in range(5):
        lost.compute(thetas[step], step, (SlotWork(2, step),))
    lost_state = lost.held_state(2)
    lost_next = lost.compute(thetas[5], 5, (SlotWork(2, 5),)).results[0]

    replacement = GradientWorker(0, CONFIG)
    with pytest.raises(ValueError, match="mid-trajectory .* no trajectory state was given"):
        replacement.compute(thetas[5], 5, (SlotWork(2, 5),))
    with pytest.raises(ValueError, match="must begin at step 3, the versions given begin at 2"):
        replacement.compute(thetas[5], 5, (SlotWork(2, 5, Rebuild((2, 3, 4))),), thetas)
    redone = replacement.compute(
        thetas[5], 5, (SlotWork(2, 5, Rebuild((3, 4))),), {3: thetas[3], 4: thetas[4]}
    ).results[0]
    assert redone.replayed == 2
    assert np.array_equal(redone.meta_grad, lost_next.meta_grad)
    assert redone.meta_loss == lost_next.meta_loss
    assert states_equal(replacement.held_state(2), lost.held_state(2))
    # The state the redone step started from is the lost one: its pairs and their ξ.
    rebuilt = rebuild_trajectory(
        CONFIG.make_optimizer(), CONFIG.make_family(), CONFIG.unroll,
        {v: torch.tensor(t) for v, t in thetas.items()}, run_seed=0, slot=2, step=5,
        rebuild=Rebuild((3, 4)), state_type=type(CONFIG.make_optimizer().init_state(1)),
        estimator=CONFIG.experimental.estimator, schedule=CONFIG.make_schedule(),
    )  # fmt: skip
    assert states_equal(rebuilt, lost_state)
    assert not torch.equal(rebuilt.particles[0].xi, rebuilt.particles[1].xi)
    # The replay with the current θ instead of the recorded versions is another state.
    wrong = GradientWorker(0, CONFIG)
    answer = wrong.compute(thetas[5], 5, (SlotWork(2, 5, Rebuild((5, 5))),), thetas)
    assert not np.array_equal(answer.results[0].meta_grad, lost_next.meta_grad)


def test_a_pes_run_cannot_continue_from_stored_trajectories(parts):
    """Format-1 checkpoints stored TBPTT trajectories; a PES slot's state is not one."""
    optimizer, family, theta = parts
    trajectory = slot_work(optimizer, family, CONFIG.unroll, theta, 0, 1, 0, None).trajectory
    state = LearnerState(
        step=1, theta=theta.numpy(), adam={},
        trajectories=(None, TrajectoryArrays.from_trajectory(trajectory), None),
        versions=((), (), ()),
    )  # fmt: skip
    with pytest.raises(ValueError, match="state slot 1 stores a trajectory .* not pes"):
        check_state(CONFIG, state)


# -- the Ray learner ------------------------------------------------------------------------


def local_theta(config, steps=STEPS):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count
    try:
        theta, _ = train_local(
            config.make_optimizer(), config.make_family(), steps=steps, run_seed=config.seed,
            unroll=config.unroll, meta_optim=config.meta_optim, meta_batch=config.meta_batch,
            experimental=config.experimental,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    return theta.numpy()


@pytest.fixture(scope="module")
def reference():
    return local_theta(CONFIG)


def run_learner(config, *, on_step=None, state=None, until=STEPS):
    learner = Learner(config, state=state)
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


def test_pes_is_not_tbptt_on_the_same_schedule(reference):
    assert not np.array_equal(reference, local_theta(TBPTT))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_pes_theta_is_bitwise_the_local_loops_for_any_worker_count(
    ray_address, reference, workers
):
    theta, reports, learner = run_learner(dataclasses.replace(CONFIG, workers=workers))
    assert np.array_equal(theta, reference)
    assert [r.step for r in reports] == list(range(STEPS))
    assert all(r.accepted == 3 for r in reports)
    # Two trajectories per antithetic pair, two pairs, three slots, two steps each.
    assert all(r.inner_steps == 3 * 2 * 2 * 2 for r in reports)
    # O(θ) per slot and step: a slot's state (2·pairs trajectories, O(p·J)) never travels.
    state_bytes = 2 * 2 * 300 * (1 + 6 * 4) * 4
    assert state_bytes > 100 * theta.nbytes
    assert learner.traffic.to_learner < 10 * STEPS * CONFIG.meta_batch * theta.nbytes


@pytest.mark.slow
def test_sigkill_of_a_pes_worker_mid_trajectory_is_redone_exactly(ray_address, reference):
    killed = []

    def kill_mid_trajectory(learner, report):
        # Step 6 is now running: worker 0's slot 0 starts a trajectory, its slot 2 is at
        # truncation 3, so the replacement replays steps 3 to 5 of slot 2, perturbations included.
        if report.step == 5:
            pid = learner.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    theta, reports, learner = run_learner(
        dataclasses.replace(CONFIG, workers=2), on_step=kill_mid_trajectory
    )
    assert killed and learner.worker_restarts == 1
    assert np.array_equal(theta, reference)


@pytest.mark.slow
def test_a_pes_run_resumes_exactly_from_theta_versions_alone(ray_address, reference):
    _, _, first = run_learner(dataclasses.replace(CONFIG, workers=2), until=7)
    state = first.state()
    assert state.trajectories == (None, None, None)
    assert state.versions == ((6,), (3, 4, 5, 6), ())  # each slot since its trajectory began
    assert sorted(state.theta_history) == [3, 4, 5, 6]
    theta, reports, _ = run_learner(dataclasses.replace(CONFIG, workers=1), state=state)
    assert [r.step for r in reports] == [7]
    assert np.array_equal(theta, reference)
