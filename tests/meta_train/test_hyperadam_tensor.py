"""The tensor-wise HyperAdam variant: per-tensor scale invariance, zero gradients, Adam start,
a bounded step, cells that see the gradient (unlike the paper's at large p), and the adaptive
per-tensor step scale, against the last step ("adaptive") or the gradient's trend ("trend")."""

from __future__ import annotations

import math

import pytest
import torch

from meta_train.optimizers.hyperadam_tensor import (
    ADAPTIVE_START_RATE,
    RHO_MAX,
    SCALE_MAX,
    TensorwiseHyperAdam,
    candidate_directions,
    segments_for,
)

SIZES = (300, 20, 500, 7)
KINDS = ("bounded", "unbounded", "adaptive", "trend", "annealed")
SCALED = ("adaptive", "trend", "annealed")  # the kinds with a per-tensor step scale


def _make(kind: str) -> TensorwiseHyperAdam:
    return TensorwiseHyperAdam(
        bounded=kind != "unbounded",
        adaptive_scale=kind in SCALED,
        scale_reference="trend" if kind in ("trend", "annealed") else "step",
        anneal_rate=kind == "annealed",
    )


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


@pytest.mark.parametrize("kind", KINDS)
def test_the_step_is_invariant_to_rescaling_each_tensor(kind):
    opt = _make(kind)
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


@pytest.mark.parametrize("kind", ["bounded", *SCALED])
@pytest.mark.parametrize("which", ["coordinate", "tensor", "everything"])
def test_zero_gradients_give_finite_steps(which, kind):
    opt = _make(kind)
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


@pytest.mark.parametrize("kind", KINDS)
def test_the_adam_reduction_start_is_adam(kind):
    opt = _make(kind)
    lr, b1, b2 = 0.003, 0.9, 0.999
    rate = 0.0 if kind in SCALED else None  # κ = 0 (and κ₀ = 0): the step scale stays at 1
    early = 0.0 if kind == "annealed" else None
    theta = opt.adam_reduction(
        _theta(opt, scale=5.0), lr=lr, beta1=b1, beta2=b2, scale_rate=rate, early_scale_rate=early
    )
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


def _scales(state) -> torch.Tensor:
    """exp(ℓ_T) of each tensor of SIZES (uniform within a tensor)."""
    starts = [sum(SIZES[:i]) for i in range(len(SIZES))]
    per_coord = torch.exp(state.log_scale)
    for start, n in zip(starts, SIZES, strict=True):
        assert bool((per_coord[start : start + n] == per_coord[start]).all())
    return per_coord[starts]


@pytest.mark.parametrize("kind", SCALED)
def test_the_adaptive_scale_grows_along_a_steady_gradient_and_shrinks_when_it_flips(kind):
    opt = _make(kind)
    theta = opt.adam_reduction(_theta(opt), lr=0.003, scale_rate=0.1)
    base = _grads(1)[0]
    flips = torch.cat([torch.full((n,), -1.0 if i % 2 else 1.0) for i, n in enumerate(SIZES)])
    state = opt.init_state(sum(SIZES), tensor_sizes=SIZES)
    # Steady on even tensors, alternating sign on odd ones: the scales part ways per tensor.
    for t in range(60):
        grad = base * (flips**t)
        _, state = opt.step(theta, grad, state, lr=opt.default_lr)
    scales = _scales(state)
    assert float(scales[0]) > 5.0 and float(scales[2]) > 5.0  # e^(0.1·59) ≈ 365, clipped
    assert float(scales[1]) < 0.2 and float(scales[3]) < 0.2
    assert float(scales.max()) <= SCALE_MAX * (1 + 1e-6)
    assert float(scales.min()) >= (1 - 1e-6) / SCALE_MAX


@pytest.mark.parametrize("kind", SCALED)
def test_the_adaptive_step_stays_bounded(kind):
    opt = _make(kind)
    theta = opt.adam_reduction(_theta(opt, seed=3, scale=100.0), lr=0.003, scale_rate=0.19)
    theta["weight_kernel"] = torch.randn(20, 20) * 100  # ρ at its bound in every coordinate
    state = opt.init_state(sum(SIZES), tensor_sizes=SIZES)
    grad = _grads(1)[0]
    for _ in range(100):
        delta, state = opt.step(theta, grad, state, lr=0.01)
        largest = candidate_directions(state.m, state.v, state.b, state.gamma).abs().amax(dim=1)
        bound = 0.01 * RHO_MAX * SCALE_MAX * largest * (1 + 1e-5)
        assert bool((delta.abs() <= bound).all())


@pytest.mark.parametrize("kind", SCALED)
def test_the_meta_gradient_reaches_the_scale_rate(kind):
    opt = _make(kind)
    theta = opt.adam_reduction(_theta(opt), lr=0.003, scale_rate=ADAPTIVE_START_RATE)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    w = torch.ones(sum(SIZES))
    state = opt.init_state(sum(SIZES), tensor_sizes=SIZES)
    for _ in range(5):  # a quadratic: the gradient is w itself
        delta, state = opt.step(theta, w, state, lr=opt.default_lr)
        w = w + delta
    w.square().sum().backward()
    # A steady gradient: a faster-growing step lowers the loss, so d loss / d κ < 0.
    assert float(theta["scale_rate"].grad) < 0


def test_the_adaptive_variant_needs_the_bounded_step_and_checks_its_rate():
    with pytest.raises(ValueError, match="bounded step"):
        TensorwiseHyperAdam(bounded=False, adaptive_scale=True)
    opt = _make("adaptive")
    with pytest.raises(ValueError, match="scale_rate must be in"):
        opt.adam_reduction(_theta(opt), lr=0.003, scale_rate=0.5)
    with pytest.raises(ValueError, match="needs the adaptive variant"):
        _make("bounded").adam_reduction(_theta(_make("bounded")), lr=0.003, scale_rate=0.01)
    assert opt.name == "hyperadam-tensor-adaptive" and "scale_rate" in opt.theta_shapes()


@pytest.mark.parametrize(
    ("kind", "method"),
    [
        ("adaptive", "hyperadam-tensor-adaptive"),
        ("trend", "hyperadam-tensor-trend"),
        ("annealed", "hyperadam-tensor-trend-annealed"),
    ],
)
def test_an_adaptive_theta_file_loads_as_its_variant(tmp_path, kind, method):
    from meta_train.theta_source import load_theta_source
    from runtime.theta import save_theta

    opt = _make(kind)
    path = save_theta(tmp_path / "theta.npz", opt.name, _theta(opt))
    loaded, theta = load_theta_source(str(path))
    assert loaded.name == method and loaded.adaptive_scale
    assert loaded.scale_reference == opt.scale_reference
    assert loaded.anneal_rate == opt.anneal_rate
    expected = torch.tensor([math.log(ADAPTIVE_START_RATE / (0.2 - ADAPTIVE_START_RATE))])
    torch.testing.assert_close(theta["scale_rate"].float(), expected)


@pytest.mark.parametrize("kind", SCALED)
@pytest.mark.parametrize("frozen", [False, True])
def test_the_adaptive_meta_gradient_is_finite_from_a_trajectorys_first_step(frozen, kind):
    # The previous direction is 0 at the first step (and a frozen tensor's gradient always is):
    # the cosine's norms are √0 there, whose derivative must not turn the meta-gradient NaN.
    opt = _make(kind)
    theta = opt.adam_reduction(_theta(opt, scale=3.0), lr=0.003, scale_rate=ADAPTIVE_START_RATE)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    w = torch.ones(sum(SIZES))
    state = opt.init_state(sum(SIZES), tensor_sizes=SIZES)
    loss = torch.zeros(())
    for _ in range(3):
        grad = w.clone()
        if frozen:
            grad[300:320] = 0.0  # the second tensor never gets a gradient
        delta, state = opt.step(theta, grad, state, lr=opt.default_lr)
        w = w + delta
        loss = loss + w.square().sum()
    loss.backward()
    for name, value in theta.items():
        assert bool(torch.isfinite(value.grad).all()), name
    assert float(theta["scale_rate"].grad.abs()) > 0


def test_the_trend_scale_holds_through_an_oscillation_the_last_step_scale_collapses_in():
    # An ill-conditioned valley, rotated off the coordinate axes (so Adam's per-coordinate
    # normalisation cannot separate it): a steady slow component along u and a 10× larger one
    # along v that flips sign every step. Against the last step the flips dominate the cosine
    # and the step collapses to its floor (the greedy one-step answer); against the β = 0.99
    # trend they mostly cancel, the slow component is left, and the step grows.
    half = 200
    u = torch.ones(2 * half) / math.sqrt(2)
    v = torch.cat([torch.ones(half), -torch.ones(half)]) / math.sqrt(2)
    finals = {}
    for kind in SCALED:
        opt = _make(kind)
        theta = opt.adam_reduction(_theta(opt), lr=0.003, scale_rate=0.05)
        state = opt.init_state(2 * half, tensor_sizes=(2 * half,))
        for t in range(500):
            _, state = opt.step(theta, u + 10.0 * v * (-1.0) ** t, state, lr=opt.default_lr)
        finals[kind] = math.exp(float(state.log_scale[0]))
    assert finals["adaptive"] < 0.1 and finals["trend"] > 1.0, finals


def test_the_trend_variant_checks_its_options():
    with pytest.raises(ValueError, match="scale_reference must be one of"):
        TensorwiseHyperAdam(adaptive_scale=True, scale_reference="last")
    with pytest.raises(ValueError, match="adaptive step scale only"):
        TensorwiseHyperAdam(scale_reference="trend")
    from meta_train.optimizers.hyperadam_tensor import tensorwise_step

    opt = _make("trend")
    with pytest.raises(ValueError, match="scale_reference must be one of"):
        tensorwise_step(
            _theta(opt), _grads(1)[0], opt.init_state(sum(SIZES), tensor_sizes=SIZES),
            lr=0.003, bounded=True, adaptive=True, scale_reference="trends",
        )  # fmt: skip
    opt = _make("trend")
    assert opt.name == "hyperadam-tensor-trend" and "scale_rate" in opt.theta_shapes()


def test_the_annealed_rate_starts_at_its_early_rate_and_settles_at_its_rate():
    # A steady gradient keeps every cosine at 1, so ℓ after n steps is Σ_{t≤n} κ_t, with
    # κ_t = κ + (κ₀ − κ)·exp(−t/100): a wrong timescale, order or step count moves the sums.
    opt = _make("annealed")
    kappa, early = 0.02, 0.15
    theta = opt.adam_reduction(_theta(opt), lr=0.003, scale_rate=kappa, early_scale_rate=early)
    grad = torch.ones(sum(SIZES))
    state = opt.init_state(sum(SIZES), tensor_sizes=SIZES)
    expected, logs = 0.0, {}
    for t in range(1, 401):
        _, state = opt.step(theta, grad, state, lr=opt.default_lr)
        if t > 1:  # the first step's trend is 0, its cosine 0
            expected += kappa + (early - kappa) * math.exp(-t / 100.0)
        logs[t] = (float(state.log_scale[0]), min(expected, math.log(SCALE_MAX)))
    for t in (2, 10, 30):
        assert logs[t][0] == pytest.approx(logs[t][1], rel=1e-4), (t, logs[t])
    assert logs[400][0] == pytest.approx(math.log(SCALE_MAX), rel=1e-6)  # clipped at the cap
    # Late in a run the rate is κ: the trend variant at κ reaches the cap only later.
    trend = _make("trend")
    theta_trend = trend.adam_reduction(_theta(trend), lr=0.003, scale_rate=kappa)
    state = trend.init_state(sum(SIZES), tensor_sizes=SIZES)
    for _ in range(30):
        _, state = trend.step(theta_trend, grad, state, lr=trend.default_lr)
    assert float(state.log_scale[0]) == pytest.approx(29 * kappa, rel=1e-4)
    assert logs[30][0] > 3 * float(state.log_scale[0])


def test_the_meta_gradient_reaches_the_early_rate():
    opt = _make("annealed")
    theta = opt.adam_reduction(_theta(opt), lr=0.003, scale_rate=0.02, early_scale_rate=0.1)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    w = torch.ones(sum(SIZES))
    state = opt.init_state(sum(SIZES), tensor_sizes=SIZES)
    for _ in range(5):
        delta, state = opt.step(theta, w, state, lr=opt.default_lr)
        w = w + delta
    w.square().sum().backward()
    # Early in a run κ₀ carries the rate: a faster-growing step lowers this loss.
    assert float(theta["scale_rate_early"].grad) < 0
    assert abs(float(theta["scale_rate_early"].grad)) > abs(float(theta["scale_rate"].grad))


def test_the_annealed_variant_checks_its_options():
    with pytest.raises(ValueError, match="defined for the trend rule"):
        TensorwiseHyperAdam(adaptive_scale=True, anneal_rate=True)
    with pytest.raises(ValueError, match="needs the annealed variant"):
        _make("trend").adam_reduction(_theta(_make("trend")), lr=0.003, early_scale_rate=0.1)
    opt = _make("annealed")
    with pytest.raises(ValueError, match="early_scale_rate must be in"):
        opt.adam_reduction(_theta(opt), lr=0.003, early_scale_rate=0.2)
    assert opt.name == "hyperadam-tensor-trend-annealed"
    assert {"scale_rate", "scale_rate_early"} <= set(opt.theta_shapes())
