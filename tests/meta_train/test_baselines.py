"""Tests for meta_train/optimizers/baselines.py and the make_* functions of the package."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from meta_train.optimizers import (
    BASELINES,
    LEARNED_OPTIMIZERS,
    SGD,
    Adadelta,
    Adagrad,
    Adam,
    Momentum,
    RMSProp,
    make_baseline,
    make_learned_optimizer,
)

# Three steps over three coordinates; the last coordinate sees 0, 0 and then a tiny gradient.
GRADS = [[0.5, -2.0, 0.0], [0.1, 1.0, 0.0], [-0.3, 0.5, 1e-9]]


# -- scalar references written from the TF 1.x update equations -------------------------------


def ref_sgd(gs, lr):
    return [-lr * g for g in gs]


def ref_momentum(gs, lr, mu=0.9):
    accum, out = 0.0, []
    for g in gs:
        accum = mu * accum + g
        out.append(-lr * accum)
    return out


def ref_adam(gs, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = v = 0.0
    out = []
    for t, g in enumerate(gs, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        out.append(-lr_t * m / (math.sqrt(v) + eps))
    return out


def ref_rmsprop(gs, lr, decay=0.9, eps=1e-10):
    ms, out = 1.0, []
    for g in gs:
        ms = decay * ms + (1 - decay) * g * g
        out.append(-lr * g / math.sqrt(ms + eps))
    return out


def ref_adagrad(gs, lr, init=0.1):
    accum, out = init, []
    for g in gs:
        accum += g * g
        out.append(-lr * g / math.sqrt(accum))
    return out


def ref_adadelta(gs, lr, rho=0.95, eps=1e-8):
    accum = accum_update = 0.0
    out = []
    for g in gs:
        accum = rho * accum + (1 - rho) * g * g
        unit = math.sqrt(accum_update + eps) / math.sqrt(accum + eps) * g
        accum_update = rho * accum_update + (1 - rho) * unit * unit
        out.append(-lr * unit)
    return out


REFERENCES = {
    "sgd": (SGD, ref_sgd, 0.1),
    "momentum": (Momentum, ref_momentum, 0.1),
    "adam": (Adam, ref_adam, 0.03125),
    "rmsprop": (RMSProp, ref_rmsprop, 0.01),
    "adagrad": (Adagrad, ref_adagrad, 0.5),
    "adadelta": (Adadelta, ref_adadelta, 1.0),
}


def _run(rule, grads):
    state = rule.init(len(grads[0]))
    deltas = []
    for g in grads:
        delta, state = rule.update(torch.tensor(g, dtype=torch.float32), state)
        deltas.append(delta)
    return torch.stack(deltas), state


@pytest.mark.parametrize("name", list(REFERENCES))
def test_three_steps_match_hand_computed_reference(name):
    cls, ref, lr = REFERENCES[name]
    deltas, _ = _run(cls(lr), GRADS)
    columns = [ref([row[k] for row in GRADS], lr) for k in range(3)]
    expected = torch.tensor(columns, dtype=torch.float32).T
    torch.testing.assert_close(deltas, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    ("rule", "grads", "expected"),
    [
        (Momentum(0.1), [[1.0], [1.0]], [-0.1, -0.19]),
        (Adagrad(0.1), [[1.0], [1.0]], [-0.09534625892455922, -0.06900655593423542]),
        (RMSProp(0.01), [[2.0]], [-0.017541160385465923]),  # ms starts at 1: √1.3, not √0.4
        (Adadelta(1.0), [[1.0]], [-0.0004472135507786051]),  # √ε/√(0.05 + ε)
        (Adam(0.1), [[1.0]], [-0.1]),  # first Adam step is −lr·sign(g)
    ],
    ids=["momentum", "adagrad", "rmsprop", "adadelta", "adam"],
)
def test_literal_values(rule, grads, expected):
    deltas, _ = _run(rule, grads)
    torch.testing.assert_close(deltas[:, 0], torch.tensor(expected), rtol=1e-6, atol=0)


def _torch_deltas(optimizer_cls, grads, per_step=None, **kwargs):
    param = torch.zeros(len(grads[0]), requires_grad=True)
    opt = optimizer_cls([param], **kwargs)
    deltas = []
    for t, g in enumerate(grads, start=1):
        if per_step is not None:
            per_step(opt.param_groups[0], t)
        before = param.detach().clone()
        param.grad = torch.tensor(g)
        opt.step()
        deltas.append(param.detach() - before)
    return torch.stack(deltas)


# Small gradients (|g| ~ ε) so that where ε sits actually matters.
TINY_GRADS = [[3e-8, -1e-7, 0.2], [1e-8, 2e-8, -0.1], [-2e-8, 5e-8, 0.05], [0.0, 1e-8, 0.3]]


def test_adam_is_torch_adam_with_tf_epsilon_hat():
    lr, b2, eps = 0.01, 0.999, 1e-8

    def tf_eps(group, t):  # TF's ε on sqrt(v) is ε / sqrt(1 − β2^t) on sqrt(v̂)
        group["eps"] = eps / math.sqrt(1 - b2**t)

    ours, _ = _run(Adam(lr), TINY_GRADS)
    matched = _torch_deltas(torch.optim.Adam, TINY_GRADS, tf_eps, lr=lr, eps=eps)
    torch.testing.assert_close(ours, matched, rtol=1e-5, atol=1e-12)
    plain = _torch_deltas(torch.optim.Adam, TINY_GRADS, lr=lr, eps=eps)
    assert not torch.allclose(ours, plain, rtol=1e-3, atol=0)  # the test can tell them apart


@pytest.mark.parametrize(
    ("ours", "torch_cls", "kwargs"),
    [
        (Momentum(0.05), torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
        (
            Adagrad(0.5),
            torch.optim.Adagrad,
            {"lr": 0.5, "initial_accumulator_value": 0.1, "eps": 0.0},
        ),
        (Adadelta(0.7), torch.optim.Adadelta, {"lr": 0.7, "rho": 0.95, "eps": 1e-8}),
    ],
    ids=["momentum", "adagrad", "adadelta"],
)
def test_rules_that_coincide_with_torch_optim(ours, torch_cls, kwargs):
    deltas, _ = _run(ours, TINY_GRADS)
    torch.testing.assert_close(deltas, _torch_deltas(torch_cls, TINY_GRADS, **kwargs))


@pytest.mark.parametrize("name", BASELINES)
def test_make_baseline_builds_each_rule_and_zero_gradients_stay_finite(name):
    rule = make_baseline(name, 0.1)
    assert rule.name == name and rule.lr == 0.1
    deltas, state = _run(rule, [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert torch.isfinite(deltas).all()
    assert torch.count_nonzero(deltas[:, 0]) == 0  # a coordinate never touched never moves
    assert all(torch.isfinite(field).all() for field in state)


@pytest.mark.parametrize("name", BASELINES)
def test_update_is_pure(name):
    rule = make_baseline(name, 0.1)
    state = rule.init(3)
    delta, state = rule.update(torch.tensor([0.3, -0.2, 0.0]), state)
    before = [field.clone() for field in state]
    rule.update(torch.tensor([1.0, 2.0, 3.0]), state)
    assert all(torch.equal(a, b) for a, b in zip(before, state, strict=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.lr = 1.0


def test_adam_without_first_moment_decay_has_no_bias_correction():
    # β1 = 0 must not hit log(0); the first-moment correction 1 − 0^t is 1.
    deltas, _ = _run(Adam(0.1, beta1=0.0), [[2.0], [-1.0]])
    expected = ref_adam([2.0, -1.0], 0.1, b1=0.0)
    torch.testing.assert_close(deltas[:, 0], torch.tensor(expected, dtype=torch.float32))


def test_state_layouts():
    assert Adam(0.1).init(4)._fields == ("m", "v", "step")
    assert Adam(0.1).init(4).step.shape == (1,)
    assert torch.equal(RMSProp(0.1).init(2).ms, torch.ones(2))
    assert torch.allclose(Adagrad(0.1).init(2).accum, torch.full((2,), 0.1))
    assert SGD(0.1).init(4) == ()
    for name in BASELINES:
        for field in make_baseline(name, 0.1).init(4):
            assert field.dtype == torch.float32


def test_learned_optimizer_names():
    assert LEARNED_OPTIMIZERS == ("hyperadam", "rnnprop", "dm")
    for name in LEARNED_OPTIMIZERS:
        opt = make_learned_optimizer(name)
        assert opt.name == name
    assert make_learned_optimizer("hyperadam").default_lr == 0.005


ERRORS = [
    ("adam-negative-lr", lambda: Adam(-0.1), "lr must be > 0, got -0.1"),
    ("sgd-zero-lr", lambda: SGD(0.0), "lr must be > 0, got 0.0"),
    ("sgd-nan-lr", lambda: SGD(float("nan")), "lr must be finite, got nan"),
    ("sgd-inf-lr", lambda: SGD(float("inf")), "lr must be finite, got inf"),
    ("adam-beta1", lambda: Adam(0.1, beta1=1.0), "beta1 must be in [0, 1), got 1.0"),
    ("adam-beta2", lambda: Adam(0.1, beta2=-0.5), "beta2 must be in [0, 1), got -0.5"),
    ("adam-eps", lambda: Adam(0.1, eps=-1e-8), "eps must be >= 0, got -1e-08"),
    ("momentum", lambda: Momentum(0.1, momentum=-0.9), "momentum must be >= 0, got -0.9"),
    ("rmsprop-decay", lambda: RMSProp(0.1, decay=1.5), "decay must be in [0, 1), got 1.5"),
    (
        "adagrad-init",
        lambda: Adagrad(0.1, initial_accumulator_value=0.0),
        "initial_accumulator_value must be > 0, got 0.0",
    ),
    ("adadelta-rho", lambda: Adadelta(0.1, rho=1.0), "rho must be in [0, 1), got 1.0"),
    ("adadelta-eps", lambda: Adadelta(0.1, eps=0.0), "eps must be > 0, got 0.0"),
    ("num-coords", lambda: Adam(0.1).init(0), "num_coords must be >= 1, got 0"),
    (
        "grad-not-flat",
        lambda: Adam(0.1).update(torch.zeros(3, 1), Adam(0.1).init(3)),
        "grad must be a flat vector, got shape (3, 1)",
    ),
    (
        "grad-wrong-length",
        lambda: RMSProp(0.1).update(torch.zeros(4), RMSProp(0.1).init(3)),
        "grad has shape (4,) but the state has (3,)",
    ),
    (
        "unknown-baseline",
        lambda: make_baseline("adamw", 0.1),
        "unknown baseline 'adamw'; known: adam, sgd, momentum, rmsprop, adagrad, adadelta",
    ),
    ("make-baseline-lr", lambda: make_baseline("adam", -1.0), "lr must be > 0, got -1.0"),
    (
        "unknown-learned",
        lambda: make_learned_optimizer("lstm"),
        "unknown learned optimizer 'lstm'; known: hyperadam, rnnprop, dm",
    ),
]


@pytest.mark.parametrize(("build", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_messages(build, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build()
