"""Bad input at the runtime's boundaries: exact messages, and nothing changes (style §6.6–7)."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.stepper import NonFiniteGradientError

SHAPES = [(10, 4), (4,), (3, 5)]


def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def grads() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(size=s).astype(np.float32) * 1e-2 for s in SHAPES]


def replace(index: int, value) -> list:
    out = grads()
    out[index] = value
    return out


def with_nan() -> list:
    out = grads()
    out[2][1, 3] = np.nan
    return out


def with_inf() -> list:
    out = grads()
    out[0][0, 0] = -np.inf
    return out


BAD_STEPS = [
    (
        "count",
        lambda: grads()[:2],
        ValueError,
        r"^expected 3 gradients \(one per parameter\), got 2$",
    ),
    (
        "shape",
        lambda: replace(0, np.zeros((10, 5), np.float32)),
        ValueError,
        r"^gradient 0 has shape \(10, 5\) but parameter 0 has \(10, 4\)$",
    ),
    (
        "dtype",
        lambda: replace(1, np.zeros(4, np.float64)),
        ValueError,
        r"^gradient 1 has dtype float64 but parameter 1 has float32$",
    ),
    (
        "non-contiguous",
        lambda: replace(2, np.zeros((5, 3), np.float32).T),
        ValueError,
        r"^gradient 2 is not C-contiguous; pass numpy\.ascontiguousarray\(gradient\)$",
    ),
    (
        "not-an-array",
        lambda: replace(1, [0.0] * 4),
        TypeError,
        r"^gradient 1 must be a numpy\.ndarray, got list$",
    ),
    (
        "not-a-sequence",
        lambda: {"a": 1},
        TypeError,
        r"^grads must be a list or tuple of numpy arrays, got dict$",
    ),
    (
        "nan",
        with_nan,
        NonFiniteGradientError,
        r"^gradient 2 contains NaN or inf \(on_nonfinite='raise'\); nothing was changed$",
    ),
    ("inf", with_inf, NonFiniteGradientError, r"^gradient 0 contains NaN or inf"),
    (
        "overflow",
        lambda: replace(1, np.full(4, 1e30, np.float32)),
        NonFiniteGradientError,
        r"^the gradients' sum of squares 4\.000e\+60 overflows float32",
    ),
]


@pytest.fixture(scope="module")
def opt(hyperadam_folder):
    return runtime.load(hyperadam_folder)


@pytest.mark.parametrize("chunk_size", [None, 7], ids=["fused", "chunked"])
@pytest.mark.parametrize(
    "make, error, message", [c[1:] for c in BAD_STEPS], ids=[c[0] for c in BAD_STEPS]
)
def test_bad_step_raises_and_changes_nothing(opt, chunk_size, make, error, message):
    params = arrays()
    stepper = opt.bind(params, chunk_size=chunk_size)
    stepper.step(grads())
    before_state, before_params = stepper.state_dict(), [p.copy() for p in params]
    with pytest.raises(error, match=message):
        stepper.step(make())
    after = stepper.state_dict()
    assert after["num_steps"] == 1
    assert all(np.array_equal(before_state["state"][k], after["state"][k]) for k in after["state"])
    assert all(np.array_equal(a, b) for a, b in zip(before_params, params, strict=True))
    assert stepper.step(grads())  # still usable


def test_skip_policy_leaves_everything_and_counts(opt):
    params = arrays()
    stepper = opt.bind(params, on_nonfinite="skip")
    before = [p.copy() for p in params]
    assert stepper.step(with_nan()) is False
    assert stepper.num_skipped == 1 and stepper.num_steps == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, params, strict=True))
    assert not stepper.state_dict()["state"]["h"].any()
    assert stepper.step(grads()) is True


def overlapping() -> list[np.ndarray]:
    base = np.zeros(20, np.float32)
    return [base[:12], base[8:]]


def read_only() -> list[np.ndarray]:
    a = np.zeros(3, np.float32)
    a.flags.writeable = False
    return [a]


BAD_BINDS = [
    (
        "set",
        lambda: {1, 2},
        {},
        TypeError,
        r"^params must be a list or tuple of numpy arrays, got set$",
    ),
    ("empty", lambda: [], {}, ValueError, r"^params must hold at least one array"),
    ("no-elements", lambda: [np.zeros(0, np.float32)], {}, ValueError, r"^params hold no elements"),
    (
        "float64",
        lambda: [np.zeros(3)],
        {},
        ValueError,
        r"^parameter 0 has dtype float64; the runtime steps float32 only$",
    ),
    (
        "non-contiguous",
        lambda: [np.zeros((4, 4), np.float32)[:, 1]],
        {},
        ValueError,
        r"^parameter 0 is not C-contiguous: it is updated in place",
    ),
    ("read-only", read_only, {}, ValueError, r"^parameter 0 is read-only"),
    ("overlap", overlapping, {}, ValueError, r"^parameter 1 overlaps parameter 0 in memory$"),
    ("lr", arrays, {"lr": 0.0}, ValueError, r"^lr must be a finite number > 0, got 0\.0$"),
    ("lr-type", arrays, {"lr": "0.1"}, TypeError, r"^lr must be a real number, got str$"),
    (
        "chunk",
        arrays,
        {"chunk_size": 0},
        ValueError,
        r"^chunk_size must be an integer >= 1, got 0$",
    ),
    (
        "policy",
        arrays,
        {"on_nonfinite": "zero"},
        ValueError,
        r"^on_nonfinite must be one of \('raise', 'skip'\), got 'zero'$",
    ),
    ("all-reduce", arrays, {"all_reduce": 3}, TypeError, r"^all_reduce must be callable, got int$"),
]


@pytest.mark.parametrize(
    "make, kwargs, error, message", [c[1:] for c in BAD_BINDS], ids=[c[0] for c in BAD_BINDS]
)
def test_bad_bind_is_refused(opt, make, kwargs, error, message):
    with pytest.raises(error, match=message):
        opt.bind(make(), **kwargs)


def test_parameter_reshaped_after_bind_is_refused(opt):
    params = arrays()
    stepper = opt.bind(params)
    params[2].shape = (5, 3)
    with pytest.raises(ValueError, match=r"^parameter 2 changed since bind: now shape \(5, 3\)"):
        stepper.step(grads())


def corrupt(saved: dict, change) -> dict:
    saved = dict(saved, state=dict(saved["state"]))
    change(saved)
    return saved


BAD_STATE_DICTS = [
    ("version", lambda s: s.update(format_version=2), r"^state_dict format .* version 2 is not"),
    ("method", lambda s: s.update(method="dm"), r"^state_dict is for dm \{'num_candidates': 20\}"),
    ("shapes", lambda s: s.update(param_shapes=[[10, 4]]), r"^state_dict was saved for parameter"),
    ("entry", lambda s: s["state"].pop("gamma"), r"^state_dict\['state'\] must have entries"),
    (
        "entry-shape",
        lambda s: s["state"].update(h=np.zeros((3, 20), np.float32)),
        r"^state entry 'h' must be a float32 array of shape \(59, 20\), got float32 array of shape",
    ),
    (
        "entry-nan",
        lambda s: s["state"].update(c=np.full((59, 20), np.nan, np.float32)),
        r"^state entry 'c' contains NaN or inf$",
    ),
    ("steps", lambda s: s.update(num_steps=-1), r"^state_dict\['num_steps'\] must be an integer"),
    ("keys", lambda s: s.pop("lr"), r"^state_dict keys differ: missing \['lr'\]"),
]


@pytest.mark.parametrize(
    "change, message", [c[1:] for c in BAD_STATE_DICTS], ids=[c[0] for c in BAD_STATE_DICTS]
)
def test_bad_state_dict_is_refused_before_anything_is_replaced(opt, change, message):
    stepper = opt.bind(arrays(), chunk_size=20)
    stepper.step(grads())
    saved = stepper.state_dict()
    with pytest.raises((ValueError, TypeError), match=message):
        stepper.load_state_dict(corrupt(saved, change))
    now = stepper.state_dict()
    assert all(np.array_equal(saved["state"][k], now["state"][k]) for k in now["state"])


def test_failure_midway_marks_the_stepper_until_restored(opt):
    params = arrays()
    calls = []

    def failing_all_reduce(partial):
        calls.append(partial)
        if len(calls) == 2:  # after Σg², at the first per-column reduction
            raise ConnectionError("peer lost")
        return partial

    stepper = opt.bind(params, chunk_size=20, all_reduce=failing_all_reduce)
    saved = stepper.state_dict()
    with pytest.raises(ConnectionError, match="peer lost"):
        stepper.step(grads())
    with pytest.raises(RuntimeError, match=r"a previous step failed midway \(ConnectionError"):
        stepper.step(grads())
    stepper.load_state_dict(saved)
    assert stepper.step(grads())
