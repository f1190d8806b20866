"""Tests for meta_train/optimizers/dmoptimizer.py (spec §7.1)."""

from __future__ import annotations

import math

import pytest
import torch

from meta_train.optimizers import DMOptimizer, DMState, make_learned_optimizer
from meta_train.optimizers.dmoptimizer import dm_step, log_and_sign, lstm_cell


def _theta(seed: int = 0, hidden_size: int = 20) -> dict[str, torch.Tensor]:
    return DMOptimizer(hidden_size).init_theta(torch.Generator().manual_seed(seed))


def _run(theta, grads, *, lr=0.1, hidden_size=20):
    opt = DMOptimizer(hidden_size)
    state = opt.init_state(grads[0].numel())
    deltas = []
    for grad in grads:
        delta, state = opt.step(theta, grad, state, lr=lr)
        deltas.append(delta)
    return deltas, state


def test_meta_parameter_count_and_tf_shapes():
    opt = DMOptimizer()
    assert opt.num_meta_parameters() == 5141
    assert opt.theta_shapes() == {
        "lstm1_kernel": (22, 80),
        "lstm1_bias": (80,),
        "lstm2_kernel": (40, 80),
        "lstm2_bias": (80,),
        "out_kernel": (20, 1),
        "out_bias": (1,),
    }
    assert (opt.name, opt.default_lr) == ("dm", 0.1)
    assert isinstance(make_learned_optimizer("dm"), DMOptimizer)


def test_init_theta_follows_tf_initialisers_and_is_seeded():
    theta = _theta(seed=3)
    for name in ("lstm1_bias", "lstm2_bias", "out_bias"):
        assert torch.count_nonzero(theta[name]) == 0, name
    # Truncated normal σ = 0.1: nothing beyond 2σ.
    assert theta["out_kernel"].abs().max() <= 0.2
    assert 0.03 < theta["out_kernel"].std() < 0.2
    # Glorot-uniform: U(−b, b) with b = sqrt(6 / (fan_in + fan_out)).
    for name, (rows, cols) in (("lstm1_kernel", (22, 80)), ("lstm2_kernel", (40, 80))):
        bound = math.sqrt(6.0 / (rows + cols))
        assert theta[name].abs().max() <= bound
        assert theta[name].abs().max() > 0.9 * bound
    again = _theta(seed=3)
    assert all(torch.equal(theta[k], again[k]) for k in theta)
    assert all(v.dtype == torch.float32 for v in theta.values())


def test_init_state_is_zero_fp32():
    state = DMOptimizer().init_state(7)
    assert isinstance(state, DMState)
    for field in state:
        assert field.shape == (7, 20) and field.dtype == torch.float32
        assert torch.count_nonzero(field) == 0


def test_hidden_size_is_validated():
    with pytest.raises(ValueError, match=r"^hidden_size must be >= 1, got 0$"):
        DMOptimizer(hidden_size=0)


def test_log_and_sign_matches_k10_rule():
    grad = torch.tensor([0.0, 1.0, -1e-6, math.exp(-5.0), -3.0])
    expected = torch.tensor(
        [
            [-1.0, 0.0],  # |g| below e^-10 is clipped: log(e^-10)/10 = -1
            [0.0, 1.0],
            [-1.0, -1e-6 * math.exp(10.0)],  # sign feature not yet saturated
            [-0.5, 1.0],
            [math.log(3.0) / 10.0, -1.0],
        ]
    )
    torch.testing.assert_close(log_and_sign(grad), expected)


def test_lstm_cell_is_tf_lstmcell_with_forget_bias_one():
    # torch.nn.LSTMCell has gate order [i, f, g, o] and no forget offset; map TF's [i, j, f, o].
    gen = torch.Generator().manual_seed(1)
    d, h = 3, 4
    kernel = torch.randn(d + h, 4 * h, generator=gen)
    bias = torch.randn(4 * h, generator=gen)
    x, h0, c0 = (torch.randn(5, n, generator=gen) for n in (d, h, h))
    i, j, f, o = kernel.chunk(4, dim=1)
    bi, bj, bf, bo = bias.chunk(4)
    ref = torch.nn.LSTMCell(d, h)
    with torch.no_grad():
        w = torch.cat([i, f, j, o], dim=1).T  # [4H, D + H]
        ref.weight_ih.copy_(w[:, :d])
        ref.weight_hh.copy_(w[:, d:])
        ref.bias_ih.copy_(torch.cat([bi, bf + 1.0, bj, bo]))
        ref.bias_hh.zero_()
        h_ref, c_ref = ref(x, (h0, c0))
    h_new, c_new = lstm_cell(x, h0, c0, kernel, bias)
    torch.testing.assert_close(h_new, h_ref)
    torch.testing.assert_close(c_new, c_ref)


def test_single_output_scale_of_point_one():
    # The original multiplies the FC output by lr = 0.1 once (nn_opt/deepmind.py): with zero
    # LSTM weights and out_bias = 1 the step is +0.1, not 0.01, and has the network's sign.
    theta = {k: torch.zeros_like(v) for k, v in _theta().items()}
    theta["out_bias"] = torch.ones(1)
    (delta,), _ = _run(theta, [torch.randn(4)])
    torch.testing.assert_close(delta, torch.full((4,), 0.1))
    (delta,), _ = _run(theta, [torch.randn(4)], lr=0.5)
    torch.testing.assert_close(delta, torch.full((4,), 0.5))


@pytest.mark.parametrize(
    "grad",
    [torch.tensor([0.0, 1e-3, -2.0, 5e-9]), torch.zeros(4), torch.tensor([1e30, -1e30, 0, 1])],
    ids=["zero-coordinate", "all-zero", "huge"],
)
def test_updates_are_finite(grad):
    deltas, state = _run(_theta(), [grad] * 3)
    for delta in deltas:
        assert delta.shape == (4,) and delta.dtype == torch.float32
        assert torch.isfinite(delta).all()
    assert all(torch.isfinite(field).all() for field in state)


def test_not_invariant_to_loss_scale():
    grads = [torch.randn(16, generator=torch.Generator().manual_seed(s)) * 1e-2 for s in range(3)]
    theta = _theta()
    small, _ = _run(theta, grads)
    large, _ = _run(theta, [g * 1e3 for g in grads])
    assert (small[-1] - large[-1]).abs().max() > 1e-4


def test_gradcheck_wrt_theta_and_state():
    opt = DMOptimizer(hidden_size=3)
    gen = torch.Generator().manual_seed(0)
    flat = opt.flatten(opt.init_theta(gen)).double().requires_grad_()
    state0 = [
        (0.5 * torch.randn(4, 3, generator=gen, dtype=torch.float64)).requires_grad_()
        for _ in DMState._fields
    ]
    grads = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(2)]

    def two_steps(flat_theta, *state_fields):
        theta, state, deltas = opt.unflatten(flat_theta), DMState(*state_fields), []
        for grad in grads:
            delta, state = dm_step(theta, grad, state, lr=0.1)
            deltas.append(delta)
        return (*deltas, *state)

    assert torch.autograd.gradcheck(two_steps, (flat, *state0))


def test_bound_optimizer_runs_without_grad():
    rule = DMOptimizer().bind(_theta())
    assert rule.lr == 0.1 and rule.name == "dm"
    state = rule.init(5)
    delta, state = rule.update(torch.randn(5), state)
    assert delta.shape == (5,) and not delta.requires_grad
