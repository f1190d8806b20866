"""Batched workers (the GPU path, run on the CPU): B instances at once agree with B slots."""

import dataclasses

import numpy as np
import pytest
import torch

from meta_train.batched import slots_work_batched
from meta_train.learner import Learner, default_worker_resources
from meta_train.run_config import build_config
from meta_train.training import init_theta_flat, slot_work, train_local
from meta_train.worker import GradientWorker, Rebuild, SlotWork

UNROLL = {"horizon": 6, "truncation": 2}


def config_for(optimizer="hyperadam", **changes):
    base = {"optimizer": optimizer, "task": "quadratic", "implementation": "reference",
            "unroll": UNROLL, "validation": {"every": 0}, "batch_slots": True}
    if optimizer == "hyperadam":
        base["num_candidates"] = 4
    return build_config({**base, **changes})


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's setting
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("optimizer", ["hyperadam", "rnnprop", "dm"])
def test_a_batch_of_instances_gives_the_meta_gradients_of_separate_slots(optimizer):
    """Three meta-steps (a trajectory start and two continuations) of four slots."""
    config = config_for(optimizer)
    model, family = config.make_optimizer(), config.make_family()
    theta = init_theta_flat(model, config.seed)
    slots = [0, 1, 2, 5]
    batched, separate = [None] * 4, [None] * 4
    for step in range(4):  # crosses into the second trajectory (3 truncations each)
        outs = slots_work_batched(model, family, config.unroll, theta, 0, slots, step, batched)
        for i, slot in enumerate(slots):
            expected = slot_work(model, family, config.unroll, theta, 0, slot, step, separate[i])
            separate[i] = expected.trajectory
            torch.testing.assert_close(outs[i].meta_grad, expected.meta_grad, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(outs[i].trajectory.params, expected.trajectory.params)
            assert outs[i].meta_loss == pytest.approx(expected.meta_loss, rel=1e-6)
            assert outs[i].trajectory.step == expected.trajectory.step
            assert outs[i].inner_losses == pytest.approx(expected.inner_losses, rel=1e-6)
        batched = [out.trajectory for out in outs]
        assert not all(torch.equal(o.meta_grad, outs[0].meta_grad) for o in outs[1:])


def test_a_mid_trajectory_slot_without_state_is_refused():
    config = config_for()
    model, family = config.make_optimizer(), config.make_family()
    theta = init_theta_flat(model, 0)
    with pytest.raises(ValueError, match="mid-trajectory .* no trajectory state was given"):
        slots_work_batched(model, family, config.unroll, theta, 0, [0, 1], 1, [None, None])


def test_a_batched_worker_matches_an_unbatched_one_and_replays_its_own_batches_bitwise():
    config = config_for()
    theta = init_theta_flat(config.make_optimizer(), 0)
    thetas = {v: (theta + 0.01 * v).numpy() for v in range(3)}
    batched = GradientWorker(0, config)
    plain = GradientWorker(0, dataclasses.replace(config, batch_slots=False))
    assert batched.batched and not plain.batched
    work = lambda step: (SlotWork(0, step), SlotWork(2, step))  # noqa: E731
    for step in range(3):
        got = batched.compute(thetas[step], step, work(step)).results
        expected = plain.compute(thetas[step], step, work(step)).results
        for a, b in zip(got, expected, strict=True):
            assert (a.slot, a.step, a.version, a.task_seed) == (b.slot, b.step, b.version,
                                                                b.task_seed)
            np.testing.assert_allclose(a.meta_grad, b.meta_grad, rtol=1e-5, atol=1e-8)
    # A replacement replays step 0 and 1 as the same batch: bitwise what the lost one held.
    replacement = GradientWorker(0, config)
    items = tuple(SlotWork(s, 2, Rebuild((0, 1))) for s in (0, 2))
    redone = replacement.compute(thetas[2], 2, items, {0: thetas[0], 1: thetas[1]}).results
    assert [m.replayed for m in redone] == [2, 2]
    for slot in (0, 2):
        lost, rebuilt = batched.trajectory(slot), replacement.trajectory(slot)
        assert np.array_equal(lost.params, rebuilt.params)
        assert all(np.array_equal(x, y) for x, y in zip(lost.state, rebuilt.state, strict=True))


def test_batched_runs_need_the_reference_step_and_a_known_device():
    with pytest.raises(ValueError, match='set implementation = "reference"'):
        config_for(implementation="fast")
    with pytest.raises(ValueError, match="device must be one of"):
        config_for(device="tpu")
    gpu = config_for(device="cuda", batch_slots=False)
    assert gpu.batched and default_worker_resources(gpu) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert default_worker_resources(config_for()) == {"num_cpus": 1.0}


@pytest.mark.slow  # a real Ray cluster and workers
def test_the_learner_with_batched_workers_tracks_the_single_process_loop(ray_address):
    steps = 4
    config = dataclasses.replace(config_for(meta_batch=3, steps=steps), workers=1)
    local, _ = train_local(config.make_optimizer(), config.make_family(), steps=steps,
                           run_seed=config.seed, unroll=config.unroll,
                           meta_optim=config.meta_optim, meta_batch=3)
    learner = Learner(config)
    try:
        learner.run(steps)
        theta = learner.theta_numpy()
    finally:
        learner.close()
    np.testing.assert_allclose(theta, local.numpy(), rtol=1e-5, atol=1e-7)
    assert not np.array_equal(theta, init_theta_flat(config.make_optimizer(), 0).numpy())


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--batch-slots"], {"batch_slots": True, "implementation": "reference"}),
        (["--device", "cuda"], {"device": "cuda", "implementation": "reference"}),
        ([], {}),
    ],
    ids=["batch-slots", "cuda", "neither"],
)
def test_the_cli_flags_select_the_batched_path(flags, expected):
    import argparse

    from meta_train.commands.meta_train_cmd import _flag_layer, register

    parser = argparse.ArgumentParser()
    register(parser)
    layer = _flag_layer(parser.parse_args(flags))
    assert {k: layer[k] for k in ("device", "batch_slots", "implementation") if k in layer} == (
        expected
    )
    config = build_config({"task": "quadratic", **layer})
    assert config.batched == bool(expected)


@pytest.mark.slow  # a real Ray cluster and workers
def test_cuda_workers_ask_ray_for_a_gpu_each(ray_address):
    """The session's cluster has no GPU: the learner says what its workers wait for."""
    from meta_train.learner import WorkerError

    config = dataclasses.replace(
        config_for(device="cuda", batch_slots=False, meta_batch=2, worker_start_timeout_s=2.0),
        workers=2,
    )
    learner = Learner(config)
    try:
        message = r"2 workers did not start within 2 s; each needs 1 CPU, 1 GPU and the Ray "
        with pytest.raises(WorkerError, match=message + r"cluster has \d+ CPU, 0 GPU"):
            learner.start()
    finally:
        learner.close()


def test_device_and_batching_are_identity_but_leave_earlier_digests_alone():
    from meta_train.run_config import config_digest, identity

    plain = build_config({"task": "quadratic"})
    assert "device" not in identity(plain) and "batch_slots" not in identity(plain)
    assert "device" not in identity(plain, schema=1)
    gpu = dataclasses.replace(plain, device="cuda", implementation="reference")
    batched = dataclasses.replace(plain, batch_slots=True, implementation="reference")
    assert identity(gpu)["device"] == "cuda" and identity(batched)["batch_slots"] is True
    reference = dataclasses.replace(plain, implementation="reference")
    assert len({config_digest(c) for c in (reference, gpu, batched)}) == 3
