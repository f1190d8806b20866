"""Gradient workers without Ray: messages, kept trajectories, exactness, fault injection."""

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
            assert message.trajectory.step == expected.trajectory.step
            assert message.finite and message.compute_s >= 0


def test_a_new_worker_continues_from_a_sent_trajectory(parts):
    _, _, theta = parts
    first = GradientWorker(0, CONFIG)
    step0 = first.compute(theta.numpy(), 0, (SlotWork(1, 0),)).results[0]
    step1 = first.compute(theta.numpy(), 0, (SlotWork(1, 1),)).results[0]
    replacement = GradientWorker(0, CONFIG)
    with pytest.raises(ValueError, match="mid-trajectory .* no trajectory state was given"):
        replacement.compute(theta.numpy(), 0, (SlotWork(1, 1),))
    redone = replacement.compute(theta.numpy(), 0, (SlotWork(1, 1, step0.trajectory),))
    assert np.array_equal(redone.results[0].meta_grad, step1.meta_grad)


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
