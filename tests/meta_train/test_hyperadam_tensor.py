"""The tensor-wise HyperAdam variant: per-tensor scale invariance, zero gradients, Adam start,
a bounded step, and cells that see the gradient (unlike the paper's at large p)."""

from __future__ import annotations

import math

import pytest
import torch

from meta_train.optimizers.hyperadam_tensor import (
    RHO_MAX,
    TensorwiseHyperAdam,
    candidate_directions,
    segments_for,
)

SIZES = (300, 20, 500, 7)


def _theta(opt: TensorwiseHyperAdam, seed: int = 0, scale: float = 1.0):
    theta = opt.init_theta(torch.Generator().manual_seed(seed))
    return {k: v * scale for k, v in theta.items()}


def _grads(steps: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Tensors at very different gradient scales, as in real models (all far above ε = 1e-24
    # inside the roots, where invariance stops by design).
    scales = torch.cat([torch.full((n,), 10.0 ** (2 - 2 * i)) for i, n in enumerate(SIZES)])
    return [torch.randn(sum(SIZES), generator=g) * scales for _ in range(steps)]


def _run(opt, theta, grads, *, lr=0.003, sizes=SIZES):
    state = opt.init_state(sum(SIZES), tensor_sizes=sizes)
    deltas = []
    for grad in grads:
        delta, state = opt.step(theta, grad, state, lr=lr)
        deltas.append(delta)
    return deltas, state


@pytest.mark.parametrize("bounded", [True, False])
def test_the_step_is_invariant_to_rescaling_each_tensor(bounded):
    opt = TensorwiseHyperAdam(bounded=bounded)
    theta = _theta(opt, scale=3.0)  # large enough that the inputs matter
    grads = _grads(8)
    factors = torch.cat(
        [torch.full((n,), f) for n, f in zip(SIZES, (1e3, 1e-3, 7.0, 1e-2), strict=True)]
    )
    plain, _ = _run(opt, theta, grads)
    scaled, _ = _run(opt, theta, [g * factors for g in grads])
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=0.003 * 1e-5)  # round-off, step units


def test_the_layout_matters_so_the_invariance_is_not_vacuous():
    opt = TensorwiseHyperAdam()
    theta = _theta(opt, scale=3.0)
    grads = _grads(4)
    per_tensor, _ = _run(opt, theta, grads)
    one_tensor, _ = _run(opt, theta, grads, sizes=None)
    assert not torch.allclose(per_tensor[-1], one_tensor[-1], rtol=1e-3)


@pytest.mark.parametrize("which", ["coordinate", "tensor", "everything"])
def test_zero_gradients_give_finite_steps(which):
    opt = TensorwiseHyperAdam()
    theta = _theta(opt, scale=3.0)
    grads = _grads(5)
    for g in grads:
        if which == "coordinate":
            g[5] = 0.0
        elif which == "tensor":
            g[300:320] = 0.0
        else:
            g.zero_()
    deltas, state = _run(opt, theta, grads)
    for delta in deltas:
        assert bool(torch.isfinite(delta).all())
    for name, tensor in state._asdict().items():
        assert bool(torch.isfinite(tensor.float()).all()), name
    if which == "everything":
        assert float(deltas[-1].abs().max()) == 0.0


@pytest.mark.parametrize("bounded", [True, False])
def test_the_adam_reduction_start_is_adam(bounded):
    opt = TensorwiseHyperAdam(bounded=bounded)
    lr, b1, b2 = 0.003, 0.9, 0.999
    theta = opt.adam_reduction(_theta(opt, scale=5.0), lr=lr, beta1=b1, beta2=b2)
    grads = [g.double().float() for g in _grads(12)]
    deltas, _ = _run(opt, theta, grads, lr=opt.default_lr)
    m = torch.zeros(sum(SIZES), dtype=torch.float64)
    v = torch.zeros_like(m)
    for t, (g, delta) in enumerate(zip(grads, deltas, strict=True), start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        adam = -lr * (m / (1 - b1**t)) / torch.sqrt(v / (1 - b2**t) + 1e-24)
        # fp32 round-off of the moments, in units of the step (m cancels where g changes sign)
        torch.testing.assert_close(delta.double(), adam, rtol=1e-5, atol=lr * 1e-5)


def test_a_bounded_step_never_exceeds_rho_max_candidate_steps():
    opt = TensorwiseHyperAdam()
    theta = _theta(opt, seed=3, scale=100.0)  # a θ that would blow an unbounded step up
    state = opt.init_state(sum(SIZES), tensor_sizes=SIZES)
    for grad in _grads(10):
        delta, state = opt.step(theta, grad, state, lr=0.01)
        largest = candidate_directions(state.m, state.v, state.b, state.gamma).abs().amax(dim=1)
        assert bool((delta.abs() <= 0.01 * RHO_MAX * largest * (1 + 1e-5)).all())
    unbounded = TensorwiseHyperAdam(bounded=False)
    deltas, _ = _run(unbounded, theta, _grads(10), lr=0.01)
    assert float(deltas[-1].abs().max()) > 0.01 * RHO_MAX * 3  # the ELU weights run away


def test_the_cells_see_the_gradient_at_large_p():
    # Two gradients that differ only in their per-tensor pattern give different decisions.
    opt = TensorwiseHyperAdam()
    theta = _theta(opt, scale=3.0)
    p = 200_000
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(p, generator=g)
    state = opt.init_state(p, tensor_sizes=(p // 2, p // 2))
    _, s1 = opt.step(theta, grad, state, lr=0.005)
    spread = s1.h.std(dim=0).mean()
    assert float(spread) > 0.01  # coordinates with different gradients get different states


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="do not add up"):
        segments_for(10, (3, 3))
    with pytest.raises(ValueError, match="do not add up"):
        segments_for(3, (3, 0))
    with pytest.raises(ValueError, match="at most lr"):
        TensorwiseHyperAdam().adam_reduction(_theta(TensorwiseHyperAdam()), lr=0.05)
    assert math.isfinite(RHO_MAX)
