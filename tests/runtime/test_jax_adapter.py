"""runtime.jax.learned_optimizer: the optax GradientTransformation contract, optax optional."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.stepper import NonFiniteGradientError

jax = pytest.importorskip("jax")
jnp = jax.numpy
from runtime.jax import GradientTransformation, learned_optimizer  # noqa: E402

SHAPES = {"w": (6, 4), "b": (4,)}


def params():
    rng = np.random.default_rng(0)
    return {k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}


def grads(t: int):
    rng = np.random.default_rng(100 + t)
    return {
        k: jnp.asarray((rng.normal(size=s) * 0.1).astype(np.float32)) for k, s in SHAPES.items()
    }


@pytest.fixture(scope="module")
def opt(hyperadam_folder):
    return runtime.load(hyperadam_folder, threads=1)


def run(tx, p, state, steps, jit=True):
    update = jax.jit(tx.update) if jit else tx.update
    for t in steps:
        updates, state = update(grads(t), state)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
    return p, state


def test_protocol_pure_init_and_update_equal_the_numpy_stepper(opt):
    tx = learned_optimizer(opt, chunk_size=8)
    assert isinstance(tx, GradientTransformation) and tx == (tx.init, tx.update)
    state0 = tx.init(params())
    p, state = run(tx, params(), state0, range(5))
    again, _ = run(tx, params(), state0, range(5), jit=False)  # state0 was not consumed
    arrays = [np.array(params()[k]) for k in ("b", "w")]  # jax flattens dict keys in order
    stepper = opt.bind(arrays, chunk_size=8)
    for t in range(5):
        stepper.step([np.array(grads(t)[k]) for k in ("b", "w")])
    for k, a in zip(("b", "w"), arrays, strict=True):
        assert np.array_equal(np.asarray(p[k]), a) and np.array_equal(np.asarray(again[k]), a)
    assert int(state.count) == 5 and int(state.num_skipped) == 0


def test_saved_state_continues_identically(opt):
    tx = learned_optimizer(opt)
    p, state = run(tx, params(), tx.init(params()), range(3))
    saved = jax.tree_util.tree_map(np.asarray, state)  # e.g. what a checkpointer writes
    expected, _ = run(tx, p, state, range(3, 6))
    restored = jax.tree_util.tree_map(jnp.asarray, saved)
    got, _ = run(learned_optimizer(opt), p, restored, range(3, 6))
    assert all(np.array_equal(expected[k], got[k]) for k in SHAPES)


def test_lr_schedule_and_nonfinite_policies(opt):
    tx = learned_optimizer(opt, lr=lambda count: 0.01 / (1.0 + count))
    state = tx.init(params())
    bad = dict(grads(0), b=jnp.full(4, jnp.nan))
    with pytest.raises(NonFiniteGradientError, match=r"^gradient 0 contains NaN or inf"):
        tx.update(bad, state)  # eager: raises
    updates, state = jax.jit(tx.update)(bad, state)  # under jit: skipped and counted
    assert int(state.num_skipped) == 1 and int(state.count) == 0
    assert not any(np.asarray(u).any() for u in jax.tree_util.tree_leaves(updates))
    with pytest.raises(ValueError, match=r"^state does not match these updates"):
        tx.update({"w": jnp.zeros((2, 2))}, state)
    with pytest.raises(ValueError, match=r"^updates leaf 0 has dtype int32"):
        tx.update({"b": jnp.zeros(4, jnp.int32), "w": jnp.zeros((6, 4))}, state)


def test_works_inside_an_optax_chain(opt):
    optax = pytest.importorskip("optax")
    tx = optax.chain(optax.clip_by_global_norm(1.0), learned_optimizer(opt))
    p, state = params(), tx.init(params())
    for t in range(3):
        updates, state = jax.jit(tx.update)(grads(t), state, p)
        p = optax.apply_updates(p, updates)
    assert int(state[1].count) == 3
    assert not np.array_equal(np.asarray(p["w"]), np.asarray(params()["w"]))


def test_jax_arrays_cannot_be_bound_in_place(opt):
    with pytest.raises(
        TypeError, match=r"^JAX arrays are immutable .* runtime\.jax\.learned_optimizer"
    ):
        opt.bind([jnp.zeros(3)])
