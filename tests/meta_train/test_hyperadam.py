"""HyperAdam's step: Adam reduction, meta-parameter count, scale invariance, zero gradients."""

import math

import pytest
import torch

from meta_train.optimizers.hyperadam import MOMENT_EPS, HyperAdam, hyperadam_step
from meta_train.seeding import generator
from meta_train.tasks.quadratic import QuadraticTask


def adam_reduced_theta(opt: HyperAdam, beta1: float, beta2: float, seed: int = 0) -> dict:
    """θ whose decay network outputs constant β, γ and whose weight network picks candidate 0."""
    theta = opt.init_theta(generator(seed))  # StateCell stays random: it must not matter
    j = opt.num_candidates
    theta["decay_kernel"].zero_()
    theta["decay_bias"] = torch.cat(
        [
            torch.full((j,), math.log(beta1 / (1 - beta1))),
            torch.full((j,), math.log(beta2 / (1 - beta2))),
        ]
    )
    theta["weight_kernel"].zero_()
    theta["weight_bias"] = torch.zeros(j)
    theta["weight_bias"][0] = 1.0  # ELU(1) = 1, ELU(0) = 0
    return theta


def test_meta_parameter_count_is_5380_at_j20():
    assert HyperAdam().num_meta_parameters() == 5380
    j = 7  # 2J + (2J·4J + 4J) + (2J·2J + 2J) + (J² + J)
    assert (
        HyperAdam(j).num_meta_parameters()
        == 2 * j + 8 * j * j + 4 * j + 4 * j * j + 2 * j + j * j + j
    )


def test_flatten_round_trip():
    opt = HyperAdam()
    theta = opt.init_theta(generator(1))
    back = opt.unflatten(opt.flatten(theta))
    assert all(torch.equal(theta[k], back[k]) for k in theta)
    with pytest.raises(ValueError, match="must be a vector of 5380 values, got shape"):
        opt.unflatten(torch.zeros(10))


def test_initialisation_follows_spec():
    theta = HyperAdam().init_theta(generator(3))
    assert theta["pre_kernel"].abs().max() <= 0.2 and theta["weight_kernel"].abs().max() <= 0.2
    limit = math.sqrt(6 / (40 + 80))
    assert theta["lstm_kernel"].abs().max() <= limit
    for name in ("pre_bias", "lstm_bias", "decay_bias", "weight_bias"):
        assert not theta[name].any()


@pytest.mark.parametrize("beta1,beta2", [(0.9, 0.999), (0.5, 0.9)])
def test_constant_decays_and_one_candidate_reduce_to_adam(beta1, beta2):
    opt = HyperAdam()
    theta = adam_reduced_theta(opt, beta1, beta2)
    # The β, γ the network really produces in fp32 (sigmoid of the logit), used by the reference.
    b1 = torch.sigmoid(theta["decay_bias"][0]).double()
    b2 = torch.sigmoid(theta["decay_bias"][-1]).double()
    lr, p = 0.01, 50
    g = generator(5)
    state = opt.init_state(p)
    m = torch.zeros(p, dtype=torch.float64)
    v = torch.zeros(p, dtype=torch.float64)
    adam_param = torch.zeros(p, requires_grad=True)
    torch_adam = torch.optim.Adam([adam_param], lr=lr, betas=(float(b1), float(b2)), eps=0.0)
    for t in range(1, 41):
        grad = torch.randn(p, generator=g) * torch.rand(p, generator=g) * 3
        delta, state = hyperadam_step(theta, grad, state, lr=lr)
        gd = grad.double()
        m = b1 * m + (1 - b1) * gd
        v = b2 * v + (1 - b2) * gd * gd
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        expected = -lr * m_hat / torch.sqrt(v_hat + MOMENT_EPS)
        torch.testing.assert_close(delta.double(), expected, rtol=2e-5, atol=1e-9)
        # and torch.optim.Adam (ε outside the root, set to 0) agrees for nonzero gradients
        before = adam_param.detach().clone()
        adam_param.grad = grad.clone()
        torch_adam.step()
        torch.testing.assert_close(delta, adam_param.detach() - before, rtol=2e-4, atol=1e-7)


def test_updates_are_invariant_to_loss_scale():
    opt = HyperAdam()
    theta = opt.init_theta(generator(2))
    task = QuadraticTask(dim=30, seed=1)

    def updates(scale: float) -> list[torch.Tensor]:
        w = task.init_params(generator(9))
        state, out = opt.init_state(task.num_params), []
        for t in range(20):
            batch = task.sample_batch(generator(9, t))
            _, grad = task.loss_and_grad(w, batch)
            delta, state = hyperadam_step(theta, grad * scale, state)
            w = w + delta
            out.append(delta)
        return out

    reference = updates(1.0)
    for scale in (1e-3, 7.0, 1e3):
        for a, b in zip(reference, updates(scale), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_zero_gradient_coordinates_and_all_zero_gradient_give_finite_updates():
    opt = HyperAdam()
    theta = opt.init_theta(generator(4))
    state = opt.init_state(6)
    grad = torch.tensor([0.0, 1.0, 0.0, -2.0, 0.0, 3e-20])
    for _ in range(3):
        delta, state = hyperadam_step(theta, grad, state)
        assert torch.isfinite(delta).all() and all(torch.isfinite(s).all() for s in state)
        assert delta[0] == 0 and delta[2] == 0  # no gradient, no moments, no movement
    delta, state = hyperadam_step(theta, torch.zeros(6), opt.init_state(6))
    assert torch.isfinite(delta).all() and not delta.any()
    delta, _ = hyperadam_step(theta, torch.zeros(6), state)
    assert torch.isfinite(delta).all()


def test_num_candidates_is_validated():
    with pytest.raises(ValueError, match="num_candidates must be >= 1, got 0"):
        HyperAdam(0)


def test_adam_reduction_is_adam_at_its_lr_through_the_default_step_size():
    from meta_train.optimizers.hyperadam import DEFAULT_LR

    opt = HyperAdam()
    theta = opt.adam_reduction(opt.init_theta(generator(3)), lr=0.02, beta1=0.9, beta2=0.999)
    p, g = 40, generator(8)
    state = opt.init_state(p)
    param = torch.zeros(p, requires_grad=True)
    # β from the fp32 logits the network really evaluates (0.9 is not exact in fp32).
    b1, b2 = (float(torch.sigmoid(theta["decay_bias"][k])) for k in (0, -1))
    adam = torch.optim.Adam([param], lr=0.02, betas=(b1, b2), eps=0.0)
    for _ in range(30):
        grad = torch.randn(p, generator=g) * torch.rand(p, generator=g) * 2
        delta, state = hyperadam_step(theta, grad, state, lr=DEFAULT_LR)
        before = param.detach().clone()
        param.grad = grad.clone()
        adam.step()
        torch.testing.assert_close(delta, param.detach() - before, rtol=2e-4, atol=1e-7)
    with pytest.raises(ValueError, match="Adam needs lr > 0"):
        opt.adam_reduction(theta, lr=0.0)
