"""Gradient workers without Ray: messages, kept and replayed trajectories, fault injection."""

import dataclasses

import numpy as np
import pytest
import torch

from meta_train.run_config import build_config
from meta_train.training import init_theta_flat, slot_work, task_seed
from meta_train.unroll import start_trajectory
from meta_train.worker import (
    FaultInjection,
    GradientWorker,
    Rebuild,
    SlotWork,
    TrajectoryArrays,
    compute_slot,
)

CONFIG = build_config(
    {
        "task": "quadratic",
        "num_candidates": 4,
        "unroll": {"horizon": 6, "truncation": 2},
        "validation": {"every": 0},
    }
)


@pytest.fixture
def parts():
    optimizer = CONFIG.make_optimizer()
    return optimizer, CONFIG.make_family(), init_theta_flat(optimizer, CONFIG.seed)


def test_trajectory_arrays_round_trip_exactly(parts):
    optimizer, family, _ = parts
    task = family.build(family.sample(3))
    trajectory = start_trajectory(optimizer, task, 3)
    arrays = TrajectoryArrays.from_trajectory(trajectory)
    back = arrays.to_trajectory(type(optimizer.init_state(1)))
    assert back.seed == 3 and back.step == 0
    assert torch.equal(back.params, trajectory.params)
    for a, b in zip(back.opt_state, trajectory.opt_state, strict=True):
        assert torch.equal(a, b)
    assert arrays.nbytes == sum(t.numel() * 4 for t in (trajectory.params, *trajectory.opt_state))


def test_trajectory_arrays_are_contiguous_even_from_the_fused_steps_planes(parts):
    # Ray ships contiguous arrays as out-of-band buffers; a transposed view would be pickled
    # in-band, a copy per message (the fused step keeps its state as [J, p] planes).
    optimizer, family, theta = parts
    fast = dataclasses.replace(CONFIG, implementation="fast").make_optimizer()
    task = family.build(family.sample(1))
    trajectory = start_trajectory(fast, task, 1)
    loss, grad = task.loss_and_grad(trajectory.params, task.sample_batch(torch.Generator()))
    _, state = fast.step(fast.unflatten(theta), grad, trajectory.opt_state, lr=0.01)
    assert any(not t.is_contiguous() for t in state), "the fused state is no longer planar"
    arrays = TrajectoryArrays.from_trajectory(trajectory._replace(opt_state=state))
    assert all(a.flags["C_CONTIGUOUS"] for a in (arrays.params, *arrays.state))
    back = arrays.to_trajectory(type(state))
    for a, b in zip(back.opt_state, state, strict=True):
        assert torch.equal(a, b)


def test_trajectory_arrays_refuse_another_state_layout(parts):
    optimizer, family, _ = parts
    arrays = TrajectoryArrays.from_trajectory(
        start_trajectory(optimizer, family.build(family.sample(0)), 0)
    )
    from meta_train.optimizers.rnnprop import RNNpropState

    with pytest.raises(ValueError, match="trajectory state has fields"):
        arrays.to_trajectory(RNNpropState)


def test_worker_keeps_each_slots_trajectory_and_matches_slot_work(parts):
    optimizer, family, theta = parts
    worker = GradientWorker(0, CONFIG)
    reference = {0: None, 2: None}
    for step in range(4):  # crosses a trajectory boundary (3 truncations per trajectory)
        answer = worker.compute(theta.numpy(), 0, (SlotWork(0, step), SlotWork(2, step)))
        assert answer.version == 0 and answer.worker_id == 0
        for message in answer.results:
            expected = slot_work(
                optimizer, family, CONFIG.unroll, theta, 0, message.slot, step,
                reference[message.slot],
            )
            reference[message.slot] = expected.trajectory
            assert np.array_equal(message.meta_grad, expected.meta_grad.numpy())
            assert message.meta_loss == expected.meta_loss
            assert message.step == step and message.version == 0
            assert message.task_seed == task_seed(0, message.slot, step // 3)
            assert message.inner_step == expected.trajectory.step
            assert message.replayed == 0
            assert message.finite and message.compute_s >= 0


def assert_same_trajectory(a: TrajectoryArrays, b: TrajectoryArrays) -> None:
    assert (a.seed, a.step, a.state_fields) == (b.seed, b.step, b.state_fields)
    assert np.array_equal(a.params, b.params)
    assert all(np.array_equal(x, y) for x, y in zip(a.state, b.state, strict=True))


@pytest.mark.parametrize("implementation", ["reference", "fast"])
def test_a_replayed_trajectory_is_bitwise_the_lost_one(parts, implementation):
    """A new worker rebuilds a mid-trajectory slot from θ versions alone, not from its state."""
    _, _, theta0 = parts
    config = dataclasses.replace(CONFIG, implementation=implementation)
    thetas = {v: (theta0 + 0.01 * v).numpy() for v in range(3)}  # a θ per version, as updates do
    lost = GradientWorker(0, config)
    for step in range(2):  # two truncations, each with its own θ version
        lost.compute(thetas[step], step, (SlotWork(1, step),))
    lost_state = lost.trajectory(1)
    lost_next = lost.compute(thetas[2], 2, (SlotWork(1, 2),)).results[0]

    replacement = GradientWorker(0, config)
    with pytest.raises(ValueError, match="mid-trajectory .* no trajectory state was given"):
        replacement.compute(thetas[2], 2, (SlotWork(1, 2),))
    replay = {0: thetas[0], 1: thetas[1]}
    redone = replacement.compute(thetas[2], 2, (SlotWork(1, 2, Rebuild((0, 1))),), replay)
    message = redone.results[0]
    assert message.replayed == 2
    assert np.array_equal(message.meta_grad, lost_next.meta_grad)
    assert message.meta_loss == lost_next.meta_loss and message.inner_step == 6
    assert_same_trajectory(replacement.trajectory(1), lost.trajectory(1))
    # The state the replay started the redone step from is the lost one too.
    again = GradientWorker(0, config)
    again.compute(thetas[1], 1, (SlotWork(1, 1, Rebuild((0,))),), {0: thetas[0]})
    again_state = again.trajectory(1)
    assert again_state.step == 4 and again_state.seed == lost_state.seed
    assert_same_trajectory(again_state, lost_state)


def test_a_replay_with_the_current_theta_is_not_the_lost_trajectory(parts):
    """Why the learner records versions: replaying with the newest θ gives another state."""
    _, _, theta0 = parts
    thetas = {v: (theta0 + 0.01 * v).numpy() for v in range(2)}
    lost = GradientWorker(0, CONFIG)
    lost.compute(thetas[0], 0, (SlotWork(0, 0),))
    lost.compute(thetas[1], 1, (SlotWork(0, 1),))
    wrong = GradientWorker(0, CONFIG)
    wrong.compute(thetas[1], 1, (SlotWork(0, 1, Rebuild((1,))),), {1: thetas[1]})
    assert not np.array_equal(wrong.trajectory(0).params, lost.trajectory(0).params)


def test_a_replay_from_a_stored_base_continues_a_format_1_state(parts):
    _, _, theta = parts
    first = GradientWorker(0, CONFIG)
    first.compute(theta.numpy(), 0, (SlotWork(1, 0),))
    base = first.trajectory(1)  # what a format-1 checkpoint stored at step 1
    step1 = first.compute(theta.numpy(), 0, (SlotWork(1, 1),)).results[0]
    step2 = first.compute(theta.numpy(), 0, (SlotWork(1, 2),)).results[0]
    replacement = GradientWorker(0, CONFIG)
    redone = replacement.compute(theta.numpy(), 0, (SlotWork(1, 1, Rebuild((), base)),))
    assert np.array_equal(redone.results[0].meta_grad, step1.meta_grad)
    later = GradientWorker(0, CONFIG)
    message = later.compute(
        theta.numpy(), 0, (SlotWork(1, 2, Rebuild((0,), base)),), {0: theta.numpy()}
    ).results[0]
    assert message.replayed == 1 and np.array_equal(message.meta_grad, step2.meta_grad)


@pytest.mark.parametrize(
    "work, replay, message",
    [
        (SlotWork(0, 2, Rebuild((0,))), {0: None}, "must begin at step 0, the versions given"),
        (SlotWork(0, 2, Rebuild((0, 1))), {0: None}, r"θ versions \[1\] are needed to replay"),
    ],
    ids=["short-replay", "missing-theta"],
)
def test_a_rebuild_that_cannot_be_exact_is_refused(parts, work, replay, message):
    _, _, theta = parts
    replay = {v: theta.numpy() for v in replay}
    with pytest.raises(ValueError, match=message):
        GradientWorker(0, CONFIG).compute(theta.numpy(), 0, (work,), replay)


def test_compute_slot_refuses_a_trajectory_at_the_wrong_position(parts):
    optimizer, family, theta = parts
    trajectory = start_trajectory(optimizer, family.build(family.sample(0)), 0)
    message = "needs the trajectory after inner step 2, got one after 0"
    with pytest.raises(ValueError, match=message):
        compute_slot(
            optimizer, family, CONFIG.unroll, theta, run_seed=0, version=0,
            work=SlotWork(0, 1), trajectory=trajectory,
        )


def test_injected_nan_gradients_are_reported_as_not_finite(parts):
    _, _, theta = parts
    worker = GradientWorker(0, CONFIG, faults=FaultInjection(frozenset({(0, 1)})))
    answer = worker.compute(theta.numpy(), 0, (SlotWork(0, 0), SlotWork(1, 0)))
    ok, bad = answer.results
    assert ok.finite and np.isfinite(ok.grad_norm)
    assert not bad.finite and np.isnan(bad.grad_norm)
    assert np.isnan(bad.meta_grad).all()


def test_worker_converts_theta_once_per_version(parts):
    _, _, theta = parts
    worker = GradientWorker(0, CONFIG)
    worker.compute(theta.numpy(), 0, (SlotWork(0, 0),))
    cached = worker._theta
    worker.compute(theta.numpy(), 0, (SlotWork(0, 1),))
    assert worker._theta is cached
    worker.compute((theta + 1).numpy(), 1, (SlotWork(0, 2),))
    assert worker._theta is not cached and torch.equal(worker._theta, theta + 1)


def test_messages_are_frozen(parts):
    _, _, theta = parts
    message = GradientWorker(0, CONFIG).compute(theta.numpy(), 0, (SlotWork(0, 0),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.version = 3
