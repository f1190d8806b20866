"""runtime.guard (the pure decisions) and runtime.guarded.GuardedStepper (restores, Adam fallback,
checkpoints, hooks) on numpy arrays; the torch adapter's guard is in test_torch_adapter.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

import runtime
from runtime import guard as gd
from runtime.guarded import GuardEvent, mlflow_hook

A = np.random.default_rng(0).normal(size=(40, 12)).astype(np.float32)
B = np.random.default_rng(1).normal(size=40).astype(np.float32)


def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
    """Least squares: a task on which the learned step descends steadily."""
    r = A @ w - B
    return float(r @ r / len(B)), (2 * A.T @ r / len(B)).astype(np.float32)


@pytest.fixture(scope="module")
def opt(hyperadam_folder):
    return runtime.load(hyperadam_folder, threads=1)


@pytest.fixture(scope="module")
def builtin():
    """The trained built-in: the learned step that descends on tasks like these."""
    return runtime.load("hyperadam", threads=1)


def run(stepper, w, steps, *, blow_up=(), record=None):
    """Steps with the loss; at the steps in ``blow_up`` the loss reported is NaN."""
    for t in steps:
        loss, grad = loss_and_grad(w)
        if record is not None:
            record.append((w.copy(), stepper.raw_state()))
        stepper.step([grad], loss=math.nan if t in blow_up else loss)


# -- the pure decisions ---------------------------------------------------------------------


def test_decisions_snapshot_restore_fall_back_and_retry():
    config = gd.GuardConfig(fallback_steps=2, backoff=2.0, snapshot_every=1, smoothing=0.0)
    state = gd.init_guard()
    decisions = []
    for loss in [4.0, 3.0, 3.5, 7.0, 3.0, 2.0, math.inf, 2.5, 2.4, 2.3, 2.2, 2.1]:
        decision, state = gd.before_step(config, state, loss)
        decisions.append((decision.restore, decision.snapshot, decision.use_adam))
    learned, snap, restore = (False, False, False), (False, True, False), (True, False, False)
    adam, adam_snap = (False, False, True), (False, True, True)
    assert decisions == [
        snap, snap, learned,  # 3.5 is no new best: no snapshot, but within 1.5 × best
        restore,  # 7.0 > 3.0 + 0.5·3.0
        adam, adam_snap,  # the fallback's 2 Adam steps (its first starts at the snapshot)
        restore,  # inf at the learned retry
        adam, adam_snap, adam_snap, adam_snap,  # the second fallback lasts 2·2 steps
        snap,  # back to the learned step
    ]  # fmt: skip
    assert state.num_fallbacks == 2 and state.mode == gd.LEARNED


def test_without_a_loss_snapshots_are_periodic_and_the_update_size_decides():
    config = gd.GuardConfig(snapshot_every=3, max_update_rms=5.0)
    state, snapshots = gd.init_guard(), []
    for _ in range(7):
        decision, state = gd.before_step(config, state, None)
        snapshots.append(decision.snapshot)
    assert snapshots == [True, False, False, True, False, False, True]
    ok, same = gd.after_learned_step(config, state, 4.9)
    assert ok and same == state
    for ratio in (5.1, math.nan, math.inf):
        ok, fallback = gd.after_learned_step(config, state, ratio)
        assert not ok and fallback.mode == gd.FALLBACK and fallback.num_fallbacks == 1


BAD_CONFIGS = [
    ({"max_rise": 0.0}, ValueError, r"^GuardConfig\.max_rise must be in \(0\.0, inf\), got 0\.0"),
    ({"smoothing": 1.0}, ValueError, r"^GuardConfig\.smoothing must be in \[0\.0, 1\.0\)"),
    ({"fallback_steps": 0}, ValueError, r"^GuardConfig\.fallback_steps must be an integer >= 1"),
    ({"backoff": 0.5}, ValueError, r"^GuardConfig\.backoff must be in \[1\.0, inf\)"),
    ({"fallback_lr": -1.0}, ValueError, r"^GuardConfig\.fallback_lr must be in \(0\.0, inf\)"),
    ({"max_update_rms": "2"}, TypeError, r"^GuardConfig\.max_update_rms must be a real number"),
]


@pytest.mark.parametrize(
    "kwargs, error, message", BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS]
)
def test_bad_configs_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        gd.GuardConfig(**kwargs)


# -- the stepper ------------------------------------------------------------------------------


def test_a_blow_up_restores_the_last_good_parameters_and_state_bitwise(opt):
    w = np.zeros(12, np.float32)
    config = gd.GuardConfig(snapshot_every=1, fallback_steps=3, smoothing=0.0)
    events: list[GuardEvent] = []
    stepper = opt.bind([w], guard=config, guard_hook=events.append)
    record: list = []
    run(stepper, w, range(8), record=record)
    assert stepper.num_fallbacks == 0 and stepper.num_steps == 8
    good_w, good_state = record[-1]  # the parameters whose loss was the last one judged good
    assert stepper.step([loss_and_grad(w)[1]], loss=float("nan")) is False
    assert np.array_equal(w, good_w)
    restored = stepper.raw_state()
    assert all(np.array_equal(restored[k], good_state[k]) for k in good_state)
    assert stepper.num_steps == 7 and stepper.num_fallbacks == 1
    (event,) = events
    assert event._replace(loss=None) == GuardEvent(8, 1, "loss", None, 3)
    assert math.isnan(event.loss)
    run(stepper, w, range(3))  # the fallback: Adam moves the parameters, the state stays put
    assert stepper.num_adam_steps == 3 and stepper.num_steps == 7
    assert not np.array_equal(w, good_w)
    assert all(np.array_equal(stepper.raw_state()[k], good_state[k]) for k in good_state)
    run(stepper, w, range(2))  # then the learned step again
    assert stepper.num_steps == 9 and stepper.guard_state.mode == gd.LEARNED


def test_a_well_behaved_run_never_fires_and_is_the_unguarded_trajectory(builtin):
    guarded_w, plain_w = np.zeros(12, np.float32), np.zeros(12, np.float32)
    guarded = builtin.bind([guarded_w], guard=True, guard_hook=None)
    plain = builtin.bind([plain_w])
    losses = []
    for _ in range(60):
        loss, grad = loss_and_grad(guarded_w)
        losses.append(loss)
        guarded.step([grad], loss=loss)
        plain.step([loss_and_grad(plain_w)[1]])
    optimum = np.linalg.lstsq(A, B, rcond=None)[0].astype(np.float32)
    best = loss_and_grad(optimum)[0]
    assert losses[-1] - best < 0.2 * (losses[0] - best)
    assert guarded.num_fallbacks == 0 and guarded.num_adam_steps == 0
    assert np.array_equal(guarded_w, plain_w)


def test_state_dict_round_trip_mid_fallback_continues_exactly(opt):
    config = gd.GuardConfig(snapshot_every=2, fallback_steps=4)
    w = np.zeros(12, np.float32)
    stepper = opt.bind([w], guard=config, guard_hook=None)
    run(stepper, w, range(9), blow_up={6})
    assert stepper.guard_state.mode == gd.FALLBACK  # mid-fallback: Adam's moments matter
    assert stepper.num_adam_steps == 2
    saved = stepper.state_dict()
    w2 = w.copy()
    run(stepper, w, range(12, 20))
    assert stepper.num_steps > 6  # the learned step resumed
    again = opt.bind([w2], guard=config, guard_hook=None)
    again.load_state_dict(saved)
    run(again, w2, range(12, 20))
    assert np.array_equal(w, w2)
    assert again.guard_state == stepper.guard_state and again.num_fallbacks == 1


def test_without_a_loss_an_oversized_update_is_undone_and_adam_takes_over(opt):
    w = np.ones(12, np.float32)
    stepper = opt.bind([w], lr=0.01, guard=gd.GuardConfig(max_update_rms=1e-6), guard_hook=None)
    before, state = w.copy(), stepper.raw_state()
    assert stepper.step([loss_and_grad(w)[1]]) is False
    assert np.array_equal(w, before) and stepper.num_fallbacks == 1
    assert all(np.array_equal(stepper.raw_state()[k], state[k]) for k in state)
    assert stepper.step([loss_and_grad(w)[1]]) is True and stepper.num_adam_steps == 1
    # Adam's first step moves every coordinate by lr (sign of the gradient)
    np.testing.assert_allclose(np.abs(w - before), 0.01, rtol=1e-4)


def test_a_bad_loss_or_gradient_changes_nothing(opt):
    w = np.zeros(12, np.float32)
    stepper = opt.bind([w], guard=True, guard_hook=None)
    run(stepper, w, range(3))
    before, guard_state = w.copy(), stepper.guard_state
    with pytest.raises(TypeError, match=r"^loss must be a real number, got str"):
        stepper.step([loss_and_grad(w)[1]], loss="high")
    with pytest.raises(ValueError, match=r"^gradient 0 has shape \(3,\) but parameter 0 has"):
        stepper.step([np.zeros(3, np.float32)], loss=1.0)
    with pytest.raises(runtime.NonFiniteGradientError):
        stepper.step([np.full(12, np.nan, np.float32)], loss=1.0)
    assert np.array_equal(w, before) and stepper.guard_state == guard_state


def test_weight_decay_applies_during_the_fallback_too(opt):
    """Adam in a fallback is AdamW when the stepper decays: its first step from a zero gradient
    is the decay alone."""
    w = np.ones(12, np.float32)
    stepper = opt.bind([w], lr=0.01, weight_decay=0.5, guard=gd.GuardConfig(max_update_rms=1e-9))
    stepper.step([loss_and_grad(w)[1]])  # undone: the fallback begins
    stepper.step([np.zeros(12, np.float32)])
    assert np.array_equal(w, np.full(12, np.float32(1 - 0.01 * 0.5)))


def test_fallbacks_are_logged_to_mlflow(opt, tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(
        client.get_experiment_by_name("hyperadam-tests").experiment_id
    ).info.run_id
    w = np.zeros(12, np.float32)
    stepper = opt.bind([w], guard=True, guard_hook=mlflow_hook(run_id, tracking_uri))
    run(stepper, w, range(5), blow_up={3})
    history = client.get_metric_history(run_id, gd.FALLBACKS_METRIC)
    assert [(m.value, m.step) for m in history] == [(1.0, 3)]


def test_a_sharded_guard_needs_the_loss(opt):
    w = np.zeros(12, np.float32)
    stepper = opt.bind([w], guard=True, guard_hook=None, all_reduce=lambda x: x)
    with pytest.raises(ValueError, match=r"^a sharded guarded step needs the loss"):
        stepper.step([loss_and_grad(w)[1]])
    assert not w.any()
    assert stepper.step([loss_and_grad(w)[1]], loss=1.0) and w.any()


def test_by_default_fallbacks_go_to_the_active_mlflow_run(opt, tracking_uri, monkeypatch):
    """The default hook logs only when the process uses MLflow and has an active run."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    w = np.zeros(12, np.float32)
    stepper = opt.bind([w], guard=True)  # guard_hook left at its default
    with mlflow.start_run(
        experiment_id=mlflow.get_experiment_by_name("hyperadam-tests").experiment_id
    ) as active:
        run(stepper, w, range(4), blow_up={2})
    run(stepper, w, range(4, 60), blow_up={59})  # no active run: nothing is logged, no error
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(
        active.info.run_id, gd.FALLBACKS_METRIC
    )
    assert [(m.value, m.step) for m in history] == [(1.0, 2)] and stepper.num_fallbacks == 2


def test_a_guarded_step_above_lr_1_works_beside_the_steppers_own_undo(builtin):
    """Above lr 1 the stepper snapshots around each step (to undo an overflow); the guarded
    stepper keeps its own last-good snapshot beside that one (their names once collided, and
    every guarded step above lr 1 raised TypeError). Without a loss, a run the guard lets
    through is the plain run, bit for bit; with one, the guard judges and the run goes on."""
    guarded_w, plain_w = np.zeros(12, np.float32), np.zeros(12, np.float32)
    guarded = builtin.bind([guarded_w], lr=2.0, guard=True, guard_hook=None)
    plain = builtin.bind([plain_w], lr=2.0)
    for _ in range(3):
        assert guarded.step([loss_and_grad(guarded_w)[1]])
        plain.step([loss_and_grad(plain_w)[1]])
    assert guarded.num_fallbacks == 0 and np.array_equal(guarded_w, plain_w)
    judged_w = np.zeros(12, np.float32)
    judged = builtin.bind([judged_w], lr=2.0, guard=True, guard_hook=None)
    for _ in range(3):
        loss, grad = loss_and_grad(judged_w)
        judged.step([grad], loss=loss)
    assert np.isfinite(judged_w).all() and judged.num_calls == 3
