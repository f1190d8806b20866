"""The tensor-wise step as one autograd node (``implementation="fast"``) against the reference:
forward, θ- and state-gradients (gradcheck in float64, fp32 on a realistic case), a truncated
unroll's meta-gradient, zero gradients, and the selection plumbing."""

from __future__ import annotations

import pytest
import torch

from meta_train.optimizers.hyperadam_tensor import (
    TensorwiseHyperAdam,
    TensorwiseState,
    tensorwise_step,
)
from meta_train.optimizers.hyperadam_tensor_fast import tensorwise_step_fast
from meta_train.tasks.small_family import SmallTaskFamily
from meta_train.unroll import UnrollConfig, start_trajectory, unroll_truncation

KINDS = ("bounded", "unbounded", "adaptive", "trend", "annealed")
# with a per-tensor step scale (against the last step, the trend, the trend at an annealed rate)
SCALED = ("adaptive", "trend", "annealed")
SIZES = (300, 20, 500, 7)  # several tensors
# What a step carries through autograd: h, c, m, v, b, Γ, and ℓ_T (adaptive).
DIFFERENTIABLE = ("h", "c", "m", "v", "b", "gamma", "log_scale")


def _make(
    kind: str, implementation: str = "reference", num_candidates: int = 20
) -> TensorwiseHyperAdam:
    return TensorwiseHyperAdam(
        num_candidates,
        bounded=kind != "unbounded",
        adaptive_scale=kind in SCALED,
        scale_reference="trend" if kind in ("trend", "annealed") else "step",
        anneal_rate=kind == "annealed",
        implementation=implementation,
    )


def _flags(kind: str) -> dict:
    return {
        "bounded": kind != "unbounded",
        "adaptive": kind in SCALED,
        "scale_reference": "trend" if kind in ("trend", "annealed") else "step",
        "anneal_rate": kind == "annealed",
    }


def _theta(opt: TensorwiseHyperAdam, dtype=torch.float32, seed: int = 0) -> dict:
    """The spec's initialisation plus noise, so no gate or bias sits at a special value."""
    theta = opt.init_theta(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    return {k: (v + 0.3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in theta.items()}


def _trainable_start(opt: TensorwiseHyperAdam) -> dict:
    """Meta-training's start (Adam at lr 3e-3, a noisy StateCell) with noise on the decay and
    weight kernels: an inner run that trains rather than diverges, whose round-off a chaotic
    (diverging) run would amplify without bound."""
    theta = opt.adam_reduction(_theta(opt), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    for name in ("decay_kernel", "weight_kernel"):
        theta[name] = theta[name] + 0.05 * torch.randn(theta[name].shape, generator=g)
    return theta


def _grads(steps: int, p: int, dtype=torch.float32, seed: int = 2) -> list[torch.Tensor]:
    """Tensors at very different scales, heavy tails and exactly-zero coordinates."""
    g = torch.Generator().manual_seed(seed)
    sizes = SIZES if sum(SIZES) == p else (p,)
    scales = torch.cat([torch.full((n,), 10.0 ** (2 - 2 * i)) for i, n in enumerate(sizes)])
    out = []
    for _ in range(steps):
        grad = torch.randn(p, generator=g) * torch.rand(p, generator=g).pow(3) * scales
        grad[torch.rand(p, generator=g) < 0.1] = 0.0
        out.append(grad.to(dtype))
    return out


def _as(state: TensorwiseState, dtype: torch.dtype) -> TensorwiseState:
    return TensorwiseState(
        *(
            x.to(dtype) if x.is_floating_point() and x is not state.segment_size else x
            for x in state
        )
    )


def _mid_state(kind: str, theta: dict, p: int, sizes, dtype, steps: int = 4) -> TensorwiseState:
    """A state some reference steps in (nonzero moments, LSTM state and step scale)."""
    opt = _make(kind)
    state = _as(opt.init_state(p, tensor_sizes=sizes), dtype)
    for grad in _grads(steps, p, dtype, seed=7):
        _, state = tensorwise_step(theta, grad, state, lr=0.003, **_flags(kind))
    return state


def _max_rel(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the largest magnitude of the reference."""
    return float((fast - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_the_reference_to_round_off(kind):
    """Ten steps from the zero state over four tensors. These gradients make the step
    ill-conditioned (tiny, heavy-tailed, zeros), so the yardstick is the exact step (float64):
    the fast step's fp32 error is within a small factor of the reference's own fp32 error."""
    opt = _make(kind)
    theta = _theta(opt)
    theta64 = {k: v.double() for k, v in theta.items()}
    p = sum(SIZES)
    ref = fast = opt.init_state(p, tensor_sizes=SIZES)
    exact = _as(ref, torch.float64)
    for grad in _grads(10, p):
        d_ref, ref = tensorwise_step(theta, grad, ref, lr=0.003, **_flags(kind))
        d_fast, fast = tensorwise_step_fast(theta, grad, fast, lr=0.003, **_flags(kind))
        d_exact, exact = tensorwise_step(theta64, grad.double(), exact, lr=0.003, **_flags(kind))
        err_ref, err_fast = _max_rel(d_ref.double(), d_exact), _max_rel(d_fast.double(), d_exact)
        assert err_fast <= 3 * err_ref + 2e-6, (err_fast, err_ref)
    for name in TensorwiseState._fields:
        want, got, truth = getattr(ref, name), getattr(fast, name), getattr(exact, name)
        if want.is_floating_point() and want.numel():
            err_ref = _max_rel(want.double(), truth.double())
            assert _max_rel(got.double(), truth.double()) <= 3 * err_ref + 2e-6, name
    assert torch.equal(fast.segment, ref.segment)


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_matches_the_reference_to_fp32_round_off(kind):
    """One step from a mid-trajectory state: every output within a few fp32 ulps."""
    opt = _make(kind)
    theta = _theta(opt)
    p = sum(SIZES)
    state = _mid_state(kind, theta, p, SIZES, torch.float32)
    grad = _grads(1, p, seed=17)[0]
    d_ref, s_ref = tensorwise_step(theta, grad, state, lr=0.003, **_flags(kind))
    d_fast, s_fast = tensorwise_step_fast(theta, grad, state, lr=0.003, **_flags(kind))
    assert _max_rel(d_fast, d_ref) < 1e-6
    for name, want, got in zip(TensorwiseState._fields, s_ref, s_fast, strict=True):
        if want.is_floating_point() and want.numel():
            assert _max_rel(got, want) < 1e-6, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["coordinate", "tensor", "everything"])
def test_zero_gradients_match_the_reference_and_stay_finite(kind, which):
    opt = _make(kind)
    theta = _theta(opt)
    p = sum(SIZES)
    state = _mid_state(kind, theta, p, SIZES, torch.float32)
    grad = _grads(1, p, seed=11)[0]
    if which == "coordinate":
        grad[5] = 0.0
    elif which == "tensor":
        grad[SIZES[0] : SIZES[0] + SIZES[1]] = 0.0
    else:
        grad.zero_()
    d_ref, s_ref = tensorwise_step(theta, grad, state, lr=0.003, **_flags(kind))
    d_fast, s_fast = tensorwise_step_fast(theta, grad, state, lr=0.003, **_flags(kind))
    assert torch.isfinite(d_fast).all()
    assert all(torch.isfinite(x).all() for x in s_fast if x.is_floating_point())
    # Everything zero gives a zero direction only if the moments are zero; relative to the
    # reference's largest value otherwise.
    if d_ref.abs().max() > 0:
        assert _max_rel(d_fast, d_ref) < 1e-5
    else:
        assert torch.equal(d_fast, d_ref)


def _two_steps(step, kind, theta_names, state, grads):
    """A function of (θ, differentiable state) for gradcheck: two steps, every output."""
    flags = _flags(kind)
    names = [n for n in DIFFERENTIABLE if getattr(state, n).numel()]

    def run(*leaves):
        theta = dict(zip(theta_names, leaves[: len(theta_names)], strict=True))
        current = state._replace(**dict(zip(names, leaves[len(theta_names) :], strict=True)))
        deltas = []
        for grad in grads:
            delta, current = step(theta, grad, current, lr=0.01, **flags)
            deltas.append(delta)
        return (*deltas, *(getattr(current, n) for n in names))

    return run, names


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_in_float64_against_theta_and_the_incoming_state(kind):
    """The hand-written backward is the derivative: torch.autograd.gradcheck, float64, p = 13 in
    two tensors, J = 4, two steps (so the node's state gradients are chained too)."""
    opt = _make(kind, num_candidates=4)
    theta = _theta(opt, torch.float64)
    sizes = (5, 8)
    state = _mid_state_j(opt, kind, theta, sizes)
    grads = list(
        torch.randn(2, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    )
    grads[1][3] = 0.0
    run, names = _two_steps(tensorwise_step_fast, kind, list(theta), state, grads)
    leaves = [x.clone().requires_grad_(True) for x in theta.values()]
    leaves += [getattr(state, n).clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(run, leaves)


def _mid_state_j(opt, kind, theta, sizes):
    state = _as(opt.init_state(sum(sizes), tensor_sizes=sizes), torch.float64)
    for grad in _grads(3, sum(sizes), torch.float64, seed=9):
        _, state = tensorwise_step(theta, grad, state, lr=0.01, **_flags(kind))
    return state


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_gradients_match_the_reference_on_a_realistic_case(kind):
    """J = 20, p = 827 in four tensors, mid-trajectory: ∂(a loss of every output)/∂(θ, state)."""
    opt = _make(kind)
    theta = _theta(opt)
    p = sum(SIZES)
    state = _mid_state(kind, theta, p, SIZES, torch.float32)
    grads = _grads(3, p, seed=13)
    results = {}
    for label, step in (("reference", tensorwise_step), ("fast", tensorwise_step_fast)):
        run, names = _two_steps(step, kind, list(theta), state, grads)
        leaves = [x.clone().requires_grad_(True) for x in theta.values()]
        leaves += [getattr(state, n).clone().requires_grad_(True) for n in names]
        outputs = run(*leaves)
        weights = torch.linspace(0.5, 1.5, len(outputs))
        loss = sum(w * (o.sum() + o.square().mean()) for w, o in zip(weights, outputs, strict=True))
        results[label] = torch.autograd.grad(loss, leaves)
    labels = [*theta, *names]
    for label, fast, ref in zip(labels, results["fast"], results["reference"], strict=True):
        assert _max_rel(fast, ref) < 1e-4, label


@pytest.mark.parametrize("kind", KINDS)
def test_a_truncated_unroll_has_the_reference_meta_gradient(kind):
    """20-step truncations on a small-family task (a 2-layer sine LSTM, four tensors),
    meta-loss "log", from the trajectory's start and from the same mid-trajectory state: the
    meta-gradients, losses and the carried state agree to round-off."""
    family = SmallTaskFamily()
    task = family.build(family.sample(0))
    unroll = UnrollConfig(horizon=40, truncation=20, meta_loss="log")
    reference, fast = _make(kind), _make(kind, "fast")
    theta = reference.flatten(_trainable_start(reference))
    start = start_trajectory(reference, task, seed=4)
    middle = unroll_truncation(reference, theta, task, start, unroll).trajectory
    for trajectory in (start, middle):
        want = unroll_truncation(reference, theta, task, trajectory, unroll)
        got = unroll_truncation(fast, theta, task, trajectory, unroll)
        # Finite at a trajectory's start too (the cosine's √0 has a zero derivative there).
        assert torch.isfinite(want.meta_grad).all() and torch.isfinite(got.meta_grad).all()
        assert want.meta_grad.abs().max() > 0
        assert _max_rel(got.meta_grad, want.meta_grad) < 1e-5
        assert got.inner_losses == pytest.approx(want.inner_losses, rel=1e-6)
        assert _max_rel(got.trajectory.params, want.trajectory.params) < 1e-6
        for name in DIFFERENTIABLE:
            expected = getattr(want.trajectory.opt_state, name)
            if expected.numel():
                # 1e-4, not 1e-6: Γ = γΓ₀ + (1 − γ) with γ ≈ 0.999 turns one ulp of γ (6e-8)
                # into 6e-5 of 1 − γ; the reference is as far from the exact value.
                assert _max_rel(getattr(got.trajectory.opt_state, name), expected) < 1e-4, name


def test_implementation_is_checked_and_defaults_to_the_reference():
    assert TensorwiseHyperAdam().implementation == "reference"
    with pytest.raises(ValueError, match="unknown implementation 'fused'"):
        TensorwiseHyperAdam(implementation="fused")


def test_the_fast_step_refuses_a_gradient_that_requires_grad():
    opt = _make("bounded", "fast")
    theta = _theta(opt)
    state = opt.init_state(10)
    with pytest.raises(ValueError, match="first-order"):
        opt.step(theta, torch.randn(10, requires_grad=True), state, lr=0.003)
    with pytest.raises(ValueError, match="flat"):
        opt.step(theta, torch.randn(2, 5), state, lr=0.003)
