"""runtime.Stepper: one global step over many arrays, chunking, state round trips, sharding."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import runtime
from meta_train.optimizers import make_learned_optimizer
from meta_train.seeding import generator
from meta_train.tasks.quadratic import QuadraticTask

METHODS = ("hyperadam", "dm", "rnnprop")
SHAPES = [(7, 5), (3,), (40,), (1, 11)]  # p = 89, several arrays of uneven sizes


def theta_for(method: str) -> dict:
    return make_learned_optimizer(method).init_theta(generator(0))  # as conftest exports


def make_arrays(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def make_grads(t: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + t)
    grads = [(rng.normal(size=s) * 10.0 ** rng.uniform(-4, 0)).astype(np.float32) for s in SHAPES]
    grads[1][:] = 0.0  # an array that receives no gradient
    return grads


def run(stepper: runtime.Stepper, arrays, steps: range) -> None:
    for t in steps:
        assert stepper.step(make_grads(t))


@pytest.fixture(scope="module")
def opt(hyperadam_folder):
    return runtime.load(hyperadam_folder)


def test_load_reads_back_the_provider(opt):
    assert opt.providers[0] == "CPUExecutionProvider"
    assert "hyperadam" in repr(opt) and opt.default_lr == 0.005


def test_load_returns_an_exported_optimizer_and_the_old_name_still_resolves(opt):
    assert isinstance(opt, runtime.ExportedOptimizer)
    with pytest.warns(DeprecationWarning, match="runtime.ExportedOptimizer"):
        assert runtime.LearnedOptimizer is runtime.ExportedOptimizer


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_size", [None, 16], ids=["fused", "chunked"])
def test_100_steps_on_least_squares_match_the_torch_reference(exported, method, chunk_size):
    task = QuadraticTask(dim=60, rows=128, batch_size=32, seed=3)
    reference = make_learned_optimizer(method)
    theta = theta_for(method)
    opt = runtime.load(exported[method])
    w0 = task.init_params(generator(4))
    w_ref, state = w0.clone(), reference.init_state(task.num_params)
    arrays = [w0[:45].numpy().reshape(9, 5).copy(), w0[45:].numpy().copy()]
    stepper = opt.bind(arrays, chunk_size=chunk_size)
    assert (stepper.num_chunks == 1) == (chunk_size is None)
    for t in range(100):
        batch = task.sample_batch(generator(5, t))
        _, grad = task.loss_and_grad(w_ref, batch)
        with torch.no_grad():
            delta, state = reference.step(theta, grad, state, lr=reference.default_lr)
        w_ref = w_ref + delta
        flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
        _, grad_rt = task.loss_and_grad(flat, batch)
        g = grad_rt.numpy()
        stepper.step([g[:45].reshape(9, 5).copy(), g[45:].copy()])
    got = np.concatenate([a.reshape(-1) for a in arrays])
    moved = (w_ref - w0).numpy()
    assert np.abs(got - w_ref.numpy()).max() <= 1e-4 * np.abs(moved).max()
    np.testing.assert_allclose(
        stepper.state_dict()["state"]["h" if method == "hyperadam" else "h1"],
        (state.h if method == "hyperadam" else state.h1).numpy(),
        atol=1e-4,
    )


def test_chunked_equals_fused_and_threads_do_not_change_bits(hyperadam_folder):
    results = []
    for chunk_size, threads in [(None, 1), (8, 1), (8, 2), (13, 3)]:
        arrays = make_arrays()
        stepper = runtime.load(hyperadam_folder, threads=threads).bind(
            arrays, chunk_size=chunk_size
        )
        assert (stepper.num_chunks > 1) == (chunk_size is not None)
        run(stepper, arrays, range(20))
        results.append((arrays, stepper.state_dict()["state"]))
    (fused, _), (chunked, chunked_state) = results[0], results[1]
    for a, b in zip(fused, chunked, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for arrays, state in results[2:3]:  # same chunks, more threads: identical bits
        assert all(np.array_equal(a, b) for a, b in zip(arrays, chunked, strict=True))
        assert all(np.array_equal(state[k], chunked_state[k]) for k in state)


def test_save_and_restore_mid_trajectory_continues_identically(opt):
    arrays = make_arrays()
    stepper = opt.bind(arrays, chunk_size=10)
    run(stepper, arrays, range(10))
    saved, saved_arrays = stepper.state_dict(), [a.copy() for a in arrays]
    run(stepper, arrays, range(10, 20))
    expected = [a.copy() for a in arrays]

    restored_arrays = [a.copy() for a in saved_arrays]
    restored = opt.bind(restored_arrays, chunk_size=10)
    restored.load_state_dict(saved)
    assert restored.num_steps == 10
    run(restored, restored_arrays, range(10, 20))
    assert all(np.array_equal(a, b) for a, b in zip(expected, restored_arrays, strict=True))
    assert all(
        np.array_equal(v, restored.state_dict()["state"][k])
        for k, v in stepper.state_dict()["state"].items()
    )


def test_state_dict_is_plain_data_in_the_reference_layout(opt):
    arrays = make_arrays()
    stepper = opt.bind(arrays, chunk_size=30)
    run(stepper, arrays, range(3))
    saved = stepper.state_dict()
    assert saved["format_version"] == 1 and saved["method"] == "hyperadam"
    assert saved["num_steps"] == 3 and saved["param_shapes"] == [list(s) for s in SHAPES]
    assert saved["state"]["h"].shape == (89, 20) and saved["state"]["m_col_sum_sq"].shape == (20,)
    np.testing.assert_allclose(  # the carried column sums are the sums of the stored moments
        saved["state"]["m_col_sum_sq"],
        (saved["state"]["m"].astype(np.float64) ** 2).sum(0),
        rtol=1e-5,
    )
    saved["state"]["h"][:] = 7  # a copy: the stepper's state is not affected
    assert not (stepper.state_dict()["state"]["h"] == 7).any()
    other = opt.bind(make_arrays(), chunk_size=None)  # another chunking restores the same state
    other.load_state_dict(stepper.state_dict())
    assert all(
        np.array_equal(v, other.state_dict()["state"][k])
        for k, v in stepper.state_dict()["state"].items()
    )


def test_lr_can_change_between_steps(opt):
    """Each step uses the lr set just before it: the same trajectory as the torch reference
    stepped with that lr sequence (which differs from any constant lr by far more than the
    tolerance, so a stepper that kept its first lr fails here)."""
    lrs = (0.005, 0.02, 0.001, 0.01)
    arrays = make_arrays()
    stepper = opt.bind(arrays)
    reference = make_learned_optimizer("hyperadam")
    theta = theta_for("hyperadam")
    w = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
    w0, state = w.clone(), reference.init_state(w.numel())
    for t, lr in enumerate(lrs):
        stepper.lr = lr  # between steps: after step t - 1, before step t
        assert stepper.lr == pytest.approx(lr)
        assert stepper.step(make_grads(t))
        grad = torch.from_numpy(np.concatenate([g.reshape(-1) for g in make_grads(t)]))
        with torch.no_grad():
            delta, state = reference.step(theta, grad, state, lr=lr)
        w = w + delta
    got = np.concatenate([a.reshape(-1) for a in arrays])
    moved = np.abs((w - w0).numpy()).max()
    assert np.abs(got - w.numpy()).max() <= 1e-4 * moved
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got -0\.1$"):
        stepper.lr = -0.1
    assert stepper.lr == pytest.approx(lrs[-1])  # a refused lr changes nothing


def test_updates_are_in_place(opt):
    arrays = make_arrays()
    views = [a.reshape(-1) for a in arrays]
    before = [a.copy() for a in arrays]
    opt.bind(arrays, chunk_size=8).step(make_grads(0))
    assert all(
        not np.array_equal(v, b.reshape(-1))
        for v, b in zip(views, before, strict=True)
        if v.size > 3
    )


def test_sharded_steps_equal_one_unsharded_step(hyperadam_folder):
    """Two shards in two threads all-reduce their partial sums (as torch.distributed would)."""
    opt = runtime.load(hyperadam_folder, threads=1)
    whole = make_arrays()
    unsharded = opt.bind(whole, chunk_size=16)
    shards = [[a.copy() for a in whole[:2]], [a.copy() for a in whole[2:]]]
    barrier, lock, totals = threading.Barrier(2), threading.Lock(), {}

    def all_reduce(partial: np.ndarray) -> np.ndarray:
        with lock:
            totals.setdefault("sum", np.zeros_like(partial))
            totals["sum"] = totals["sum"] + partial
        barrier.wait()
        result = totals["sum"].copy()
        barrier.wait()
        with lock:
            totals.pop("sum", None)
        barrier.wait()
        return result

    steppers = [opt.bind(s, chunk_size=16, all_reduce=all_reduce) for s in shards]

    def run_shard(index: int) -> None:
        for t in range(10):
            grads = make_grads(t)
            steppers[index].step(grads[:2] if index == 0 else grads[2:])

    threads = [threading.Thread(target=run_shard, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    run(unsharded, whole, range(10))
    for a, b in zip(whole, shards[0] + shards[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert all(s.num_steps == 10 for s in steppers)


def test_closing_the_optimizer_keeps_its_steppers_working(hyperadam_folder):
    with runtime.load(hyperadam_folder, threads=2) as opt:
        arrays = make_arrays()
        stepper = opt.bind(arrays, chunk_size=8)
        run(stepper, arrays, range(2))
    run(stepper, arrays, range(2, 4))  # chunks now run inline
    assert stepper.num_steps == 4


def copies(stepper, arrays):
    return [a.copy() for a in arrays], stepper.state_dict()


def assert_unchanged(stepper, arrays, before):
    params, state = before
    assert all(np.array_equal(a, b) for a, b in zip(arrays, params, strict=True))
    now = stepper.state_dict()
    assert now["num_steps"] == state["num_steps"]
    assert all(np.array_equal(now["state"][k], v) for k, v in state["state"].items())


@pytest.mark.parametrize("chunk_size", [8, 4096], ids=["staged", "fused"])
def test_a_step_whose_result_overflows_changes_nothing_and_raises(opt, chunk_size):
    """An lr near float32's largest value makes w − lr·d overflow (the built-in already does at
    1e38): the step must not write inf into the parameters."""
    arrays = make_arrays()
    stepper = opt.bind(arrays, chunk_size=chunk_size)
    run(stepper, arrays, range(2))
    before = copies(stepper, arrays)
    stepper.lr = 3e38
    with pytest.raises(
        runtime.NonFiniteStepError,
        match=r"^the step with lr 3e\+38 would make the parameters non-finite \(overflow\); "
        r"parameters and state are unchanged$",
    ):
        stepper.step(make_grads(2))
    assert_unchanged(stepper, arrays, before)
    # Still usable: the next step is the one an untouched twin takes.
    twin_arrays = [a.copy() for a in arrays]
    twin = opt.bind(twin_arrays, chunk_size=chunk_size)
    twin.load_state_dict(before[1])
    stepper.lr = twin.lr
    run(stepper, arrays, range(2, 3))
    run(twin, twin_arrays, range(2, 3))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, twin_arrays, strict=True))


def test_an_overflowing_step_is_skipped_under_skip():
    """The issue's case: the built-in at lr = 1e38 wrote inf and step() returned True."""
    arrays = make_arrays()
    stepper = runtime.load("hyperadam", threads=1).bind(arrays, lr=1e38, on_nonfinite="skip")
    before = copies(stepper, arrays)
    assert stepper.step(make_grads(0)) is False
    assert_unchanged(stepper, arrays, before)
    assert stepper.num_skipped == 1 and stepper.num_steps == 0


def test_non_finite_parameters_are_refused_before_the_step(opt):
    arrays = make_arrays()
    arrays[1][0] = np.nan
    stepper = opt.bind(arrays)
    before = copies(stepper, arrays)
    with pytest.raises(
        runtime.NonFiniteStepError, match=r"^the parameters hold NaN or inf before the step$"
    ):
        stepper.step(make_grads(0))
    assert np.isnan(arrays[1][0])
    arrays[1][0] = before[0][1][0] = 0.0
    assert_unchanged(stepper, arrays, before)
