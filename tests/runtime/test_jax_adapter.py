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


optax = pytest.importorskip("optax")


def test_weight_decay_equals_adamw_exactly_when_the_learned_update_is_zero(opt):
    """Zero gradients at the first step: the learned update is exactly zero, so the update is
    the decay term alone, which must be optax.adamw's bit for bit."""
    zero = jax.tree_util.tree_map(jnp.zeros_like, grads(0))
    tx = learned_optimizer(opt, learning_rate=0.01, weight_decay=0.1)
    ours, _ = jax.jit(tx.update)(zero, tx.init(params()), params())
    adamw = optax.adamw(0.01, weight_decay=0.1)
    ref, _ = adamw.update(zero, adamw.init(params()), params())
    assert any(np.asarray(u).any() for u in jax.tree_util.tree_leaves(ours))
    for k in SHAPES:
        assert np.array_equal(np.asarray(ours[k]), np.asarray(ref[k]))
    with pytest.raises(ValueError, match=r"needs the current parameters"):
        tx.update(zero, tx.init(params()))


def test_weight_decay_adds_the_decay_term_to_the_learned_update(opt):
    plain, decayed = learned_optimizer(opt, 0.01), learned_optimizer(opt, 0.01, weight_decay=0.5)
    u, _ = plain.update(grads(0), plain.init(params()))
    v, _ = decayed.update(grads(0), decayed.init(params()), params())
    for k in SHAPES:
        expected = np.asarray(u[k]) - np.float32(0.01) * (np.float32(0.5) * np.asarray(params()[k]))
        assert np.array_equal(np.asarray(v[k]), expected)


def test_an_optax_schedule_changes_the_step_size(opt):
    """Warm-up then cosine: each update is the constant-lr update scaled by the schedule's lr
    at that count (the state does not depend on lr)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.01, warmup_steps=3, decay_steps=8)
    scheduled, constant = learned_optimizer(opt, schedule), learned_optimizer(opt, 0.01)
    s1, s2 = scheduled.init(params()), constant.init(params())
    for t in range(6):
        u1, s1 = jax.jit(scheduled.update)(grads(t), s1)
        u2, s2 = jax.jit(constant.update)(grads(t), s2)
        ratio = float(schedule(t)) / 0.01
        for k in SHAPES:
            np.testing.assert_allclose(u1[k], np.asarray(u2[k]) * ratio, rtol=1e-5, atol=1e-12)
    assert float(schedule(1)) != float(schedule(4))


def test_works_under_inject_hyperparams(opt):
    """optax.inject_hyperparams passes learning_rate (and weight_decay) as arrays, traced under
    jit; the lr can then be changed in the state between steps."""
    tx = optax.inject_hyperparams(learned_optimizer)(source=opt, learning_rate=0.01)
    state = tx.init(params())
    update = jax.jit(tx.update)
    u1, state = update(grads(0), state, params())
    reference = learned_optimizer(opt, 0.01)
    r1, _ = reference.update(grads(0), reference.init(params()))
    assert all(np.array_equal(np.asarray(u1[k]), np.asarray(r1[k])) for k in SHAPES)
    state.hyperparams["learning_rate"] = jnp.asarray(0.002)
    u2, state = update(grads(1), state, params())
    assert int(state.inner_state.count) == 2
    assert float(jnp.abs(u2["w"]).mean()) < float(jnp.abs(u1["w"]).mean())


def guarded_run(tx, p, state, steps, *, blow_up=(), jit=True):
    update = jax.jit(tx.update) if jit else tx.update
    seen = []
    for t in steps:
        seen.append(p)
        loss = float(sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(p)))
        updates, state = update(grads(t), state, p, loss=jnp.nan if t in blow_up else loss)
        p = optax.apply_updates(p, updates)
    return p, state, seen


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_guard_restores_on_a_blow_up_and_its_state_round_trips(opt, jit):
    from runtime.guard import GuardConfig
    from runtime.jax import num_fallbacks

    config = GuardConfig(snapshot_every=1, fallback_steps=3, smoothing=0.0)
    tx = optax.chain(optax.clip_by_global_norm(10.0), learned_optimizer(opt, 0.01, guard=config))
    p, state, seen = guarded_run(tx, params(), tx.init(params()), range(4), jit=jit)
    snapshot = state[1].guard.snapshot_params
    p, state, _ = guarded_run(tx, p, state, [4], blow_up={4}, jit=jit)
    assert num_fallbacks(state) == 1
    leaves = jax.tree_util.tree_leaves(p)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, snapshot, strict=True))
    assert any(
        all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree_util.tree_leaves(s), strict=True))
        for s in seen
    )  # the snapshot is parameters the run had
    saved = jax.tree_util.tree_map(np.asarray, state)
    expected, end, _ = guarded_run(tx, p, state, range(5, 12), jit=jit)
    restored = jax.tree_util.tree_map(jnp.asarray, saved)
    got, _, _ = guarded_run(tx, p, restored, range(5, 12), jit=jit)
    assert all(np.array_equal(expected[k], got[k]) for k in SHAPES)
    guard = end[1].guard.scalars
    assert int(guard["num_adam_steps"]) == 3 and int(end[1].count) > int(state[1].count)


def test_guard_never_fires_on_a_descending_run_and_matches_the_unguarded_updates(opt):
    guarded, plain = learned_optimizer(opt, 0.01, guard=True), learned_optimizer(opt, 0.01)
    p, state, _ = guarded_run(guarded, params(), guarded.init(params()), range(6))
    q, s = params(), plain.init(params())
    for t in range(6):
        u, s = jax.jit(plain.update)(grads(t), s)
        q = optax.apply_updates(q, u)
    assert int(state.guard.scalars["num_fallbacks"]) == 0
    assert all(np.array_equal(p[k], q[k]) for k in SHAPES)


def test_guard_without_a_loss_never_returns_an_oversized_update(opt):
    """No loss: a learned update whose RMS exceeds max_update_rms·lr is replaced by the way
    back to the snapshot (here: the current parameters, a zero update), then Adam steps."""
    from runtime.guard import GuardConfig

    tx = learned_optimizer(opt, 0.01, guard=GuardConfig(max_update_rms=1e-6, fallback_steps=2))
    state = tx.init(params())
    updates, state = jax.jit(tx.update)(grads(0), state, params())
    assert not any(np.asarray(u).any() for u in jax.tree_util.tree_leaves(updates))
    assert int(state.guard.scalars["num_fallbacks"]) == 1 and int(state.count) == 0
    updates, state = jax.jit(tx.update)(grads(1), state, params())
    # Adam's first step: lr times the sign of the gradient, per coordinate
    for k in SHAPES:
        np.testing.assert_allclose(np.abs(updates[k]), 0.01, rtol=1e-4)
    assert int(state.guard.scalars["num_adam_steps"]) == 1
