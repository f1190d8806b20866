"""The runtime on the paper's MNIST MLP (mnist-nn-sigmoid-100): the torch reference's trajectory to
fp32 tolerance (fused and chunked), and the same bits through numpy, torch and JAX arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from meta_train.optimizers import make_learned_optimizer
from meta_train.seeding import generator
from meta_train.tasks import build_test_task


def theta_for(method: str) -> dict:
    return make_learned_optimizer(method).init_theta(generator(0))  # as conftest exports


SIZES = [784 * 20, 20, 20 * 10, 10]  # the task's flat layout: W1, b1, W2, b2 (p = 15,910)
SHAPES = [(784, 20), (20,), (20, 10), (10,)]


@pytest.fixture(scope="module")
def task():
    try:
        return build_test_task("mnist-nn-sigmoid-100")
    except FileNotFoundError as err:
        pytest.skip(f"MNIST is not available: {err}")


def split(flat: np.ndarray) -> list[np.ndarray]:
    bounds = np.cumsum([0, *SIZES])
    return [
        flat[a:b].reshape(s).copy() for a, b, s in zip(bounds, bounds[1:], SHAPES, strict=False)
    ]


def flat_grad(task, flat: np.ndarray, t: int) -> np.ndarray:
    _, grad = task.loss_and_grad(torch.from_numpy(flat.copy()), task.sample_batch(generator(7, t)))
    return grad.numpy()


@pytest.mark.slow  # 100 MNIST steps twice (≈ 10 s)
def test_100_mnist_steps_match_the_torch_reference(task, hyperadam_folder):
    """Chunked (the default for p = 15,910); chunked == fused is tests/runtime/test_stepper's."""
    reference, theta = make_learned_optimizer("hyperadam"), theta_for("hyperadam")
    w0 = task.init_params(generator(3))
    w_ref, state = w0.clone(), reference.init_state(task.num_params)
    arrays = split(w0.numpy())
    stepper = runtime.load(hyperadam_folder, threads=1).bind(arrays)
    assert stepper.num_chunks > 1
    for t in range(100):
        _, grad = task.loss_and_grad(w_ref, task.sample_batch(generator(7, t)))
        with torch.no_grad():
            delta, state = reference.step(theta, grad, state, lr=reference.default_lr)
        w_ref = w_ref + delta
        g = flat_grad(task, np.concatenate([a.reshape(-1) for a in arrays]), t)
        stepper.step(split(g))
    got = np.concatenate([a.reshape(-1) for a in arrays])
    moved = np.abs((w_ref - w0).numpy()).max()
    assert np.abs(got - w_ref.numpy()).max() <= 1e-4 * moved
    np.testing.assert_allclose(stepper.state_dict()["state"]["m"], state.m.numpy(), atol=1e-5)


def test_numpy_torch_and_jax_arrays_give_the_same_bits(task, hyperadam_folder):
    jax = pytest.importorskip("jax")
    from runtime.jax import learned_optimizer
    from runtime.torch import LearnedOptimizer

    steps, opt = 10, runtime.load(hyperadam_folder, threads=1)
    w0 = task.init_params(generator(3)).numpy()

    numpy_params = split(w0)
    stepper = opt.bind(numpy_params, chunk_size=4096)
    for t in range(steps):
        stepper.step(split(flat_grad(task, np.concatenate([a.ravel() for a in numpy_params]), t)))

    torch_params = [torch.nn.Parameter(torch.from_numpy(a)) for a in split(w0)]
    torch_opt = LearnedOptimizer(torch_params, opt, chunk_size=4096)
    for t in range(steps):
        g = split(
            flat_grad(task, np.concatenate([p.detach().numpy().ravel() for p in torch_params]), t)
        )
        for p, gi in zip(torch_params, g, strict=True):
            p.grad = torch.from_numpy(gi)
        torch_opt.step()

    tx = learned_optimizer(opt, chunk_size=4096)
    jax_params = [jax.numpy.asarray(a) for a in split(w0)]
    jax_state, update = tx.init(jax_params), jax.jit(tx.update)
    for t in range(steps):
        g = split(flat_grad(task, np.concatenate([np.asarray(p).ravel() for p in jax_params]), t))
        updates, jax_state = update([jax.numpy.asarray(x) for x in g], jax_state)
        jax_params = [p + u for p, u in zip(jax_params, updates, strict=True)]

    for a, p, j in zip(numpy_params, torch_params, jax_params, strict=True):
        assert np.array_equal(a, p.detach().numpy()), "torch differs from numpy"
        assert np.array_equal(a, np.asarray(j)), "JAX differs from numpy"
    assert int(jax_state.count) == steps == stepper.num_steps
