"""Tests for meta_train/optimizers/rnnprop.py (spec §7.2)."""

from __future__ import annotations

import math

import pytest
import torch

from meta_train.optimizers import RNNprop, RNNpropState, make_learned_optimizer
from meta_train.optimizers.rnnprop import adam_features, rnnprop_step


def _theta(seed: int = 0, hidden_size: int = 20) -> dict[str, torch.Tensor]:
    return RNNprop(hidden_size).init_theta(torch.Generator().manual_seed(seed))


def _grads(n: int, p: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p, generator=gen) * 0.1 for _ in range(n)]


def _run(theta, grads, *, lr=0.1):
    opt = RNNprop()
    state = opt.init_state(grads[0].numel())
    deltas = []
    for grad in grads:
        delta, state = opt.step(theta, grad, state, lr=lr)
        deltas.append(delta)
    return deltas, state


def test_meta_parameter_count_and_tf_shapes():
    opt = RNNprop()
    assert opt.num_meta_parameters() == 6641
    assert opt.theta_shapes() == {
        "pre_kernel": (2, 20),
        "pre_bias": (20,),
        "lstm1_kernel": (40, 80),
        "lstm1_bias": (80,),
        "lstm2_kernel": (40, 80),
        "lstm2_bias": (80,),
        "out_kernel": (20, 1),
        "out_bias": (1,),
    }
    assert (opt.name, opt.default_lr) == ("rnnprop", 0.1)
    assert isinstance(make_learned_optimizer("rnnprop"), RNNprop)


def test_init_theta_follows_tf_initialisers():
    theta = _theta(seed=5)
    for name in ("pre_bias", "lstm1_bias", "lstm2_bias", "out_bias"):
        assert torch.count_nonzero(theta[name]) == 0, name
    for name in ("pre_kernel", "out_kernel"):
        assert theta[name].abs().max() <= 0.2, name
    bound = math.sqrt(6.0 / (40 + 80))
    for name in ("lstm1_kernel", "lstm2_kernel"):
        assert bound * 0.9 < theta[name].abs().max() <= bound, name


def test_init_state_layout():
    state = RNNprop().init_state(6)
    assert isinstance(state, RNNpropState)
    assert state.m.shape == state.v.shape == (6,)
    assert state.step.shape == (1,)
    for field in (state.h1, state.c1, state.h2, state.c2):
        assert field.shape == (6, 20)
    for field in state:
        assert field.dtype == torch.float32 and torch.count_nonzero(field) == 0


def test_hidden_size_is_validated():
    with pytest.raises(ValueError, match=r"^hidden_size must be >= 1, got -1$"):
        RNNprop(hidden_size=-1)


def test_adam_features_match_the_original_running_products():
    # The original carries b1t = b2t = 0.95^t as running products; we carry t.
    grads = _grads(4, p=5)
    state = RNNprop().init_state(5)
    m = v = torch.zeros(5, dtype=torch.float64)
    b1t = b2t = 1.0
    theta = _theta()
    for t, grad in enumerate(grads, start=1):
        features, *_ = adam_features(grad, state)
        _, state = rnnprop_step(theta, grad, state)
        g = grad.double()
        m, v = 0.95 * m + 0.05 * g, 0.95 * v + 0.05 * g * g
        b1t, b2t = b1t * 0.95, b2t * 0.95
        sv = torch.sqrt(v / (1 - b2t)) + 1e-8
        expected = torch.stack([g / sv, (m / (1 - b1t)) / sv], dim=1).float()
        torch.testing.assert_close(features, expected)
        assert state.step.tolist() == [float(t)]


def test_first_step_features_are_signs():
    grad = torch.tensor([0.3, -2e-3, 0.0, 7.0])
    features, *_ = adam_features(grad, RNNprop().init_state(4))
    torch.testing.assert_close(features[:, 0], features[:, 1])
    torch.testing.assert_close(features[:, 0], torch.sign(grad), atol=1e-5, rtol=0)


@pytest.mark.parametrize("out_bias", [-50.0, -0.3, 0.0, 0.7, 50.0])
def test_step_is_minus_alpha_tanh_of_the_output(out_bias):
    # α multiplies after the tanh, once (nn_opt/rnn.py: a = tanh(a) * 0.1; x -= a).
    theta = {k: torch.zeros_like(v) for k, v in _theta().items()}
    theta["out_bias"] = torch.tensor([out_bias])
    (delta,), _ = _run(theta, _grads(1, p=3))
    torch.testing.assert_close(delta, torch.full((3,), -0.1 * math.tanh(out_bias)))


def test_steps_are_bounded_by_alpha():
    theta = _theta()
    theta["out_bias"] = torch.tensor([1e3])
    deltas, _ = _run(theta, _grads(3), lr=0.25)
    for delta in deltas:
        assert delta.abs().max() <= 0.25


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_invariant_to_loss_scale_up_to_eps(scale):
    grads = _grads(5)
    theta = _theta()
    base, base_state = _run(theta, grads)
    scaled, scaled_state = _run(theta, [g * scale for g in grads])
    for a, b in zip(base, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(base_state.h2, scaled_state.h2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "grad",
    [torch.tensor([0.0, 1e-3, -2.0, 5e-9]), torch.zeros(4), torch.tensor([1e15, -1e15, 0, 1])],
    ids=["zero-coordinate", "all-zero", "huge"],
)
def test_updates_are_finite(grad):
    deltas, state = _run(_theta(), [grad] * 3)
    for delta in deltas:
        assert delta.shape == (4,) and delta.dtype == torch.float32
        assert torch.isfinite(delta).all()
    assert all(torch.isfinite(field).all() for field in state)


def test_gradcheck_wrt_theta_and_state():
    opt = RNNprop(hidden_size=3)
    gen = torch.Generator().manual_seed(0)
    flat = opt.flatten(opt.init_theta(gen)).double().requires_grad_()
    lstm0 = [
        (0.5 * torch.randn(4, 3, generator=gen, dtype=torch.float64)).requires_grad_()
        for _ in range(4)
    ]
    m0 = (0.1 * torch.randn(4, generator=gen, dtype=torch.float64)).requires_grad_()
    v0 = (0.01 + 0.1 * torch.rand(4, generator=gen, dtype=torch.float64)).requires_grad_()
    step0 = torch.tensor([3.0], dtype=torch.float64)
    grads = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(2)]

    def two_steps(flat_theta, m, v, *lstm_fields):
        theta, deltas = opt.unflatten(flat_theta), []
        state = RNNpropState(m, v, step0, *lstm_fields)
        for grad in grads:
            delta, state = rnnprop_step(theta, grad, state, lr=0.1)
            deltas.append(delta)
        return (*deltas, state.m, state.v, state.h1, state.c1, state.h2, state.c2)

    assert torch.autograd.gradcheck(two_steps, (flat, m0, v0, *lstm0))


def test_default_size_is_differentiable_wrt_theta():
    opt = RNNprop()
    flat = opt.flatten(_theta()).requires_grad_()
    deltas, _ = _run(opt.unflatten(flat), _grads(3))
    (grad,) = torch.autograd.grad(sum(d.sum() for d in deltas), flat)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
