"""The tensor-wise HyperAdam variants through the runtime: per-array statistics across chunks and
shards, parity with the torch reference over many steps, zero gradients, per-tensor scale
invariance and the Adam-reduction start; the adaptive and trend variants' step scale (its
cosine's ε, its clip; the trend variant's cosine with the gradient's trend, not the last step)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import runtime
from export import export_optimizer
from export.parity import relative_error, run_shards
from meta_train.optimizers.hyperadam_tensor import TREND_FEATURE, TensorwiseHyperAdam
from meta_train.seeding import generator
from meta_train.theta_source import reference_for_theta
from runtime import manifest as mf
from runtime.theta import load_theta

ADAPTIVE, TREND = mf.HYPERADAM_TENSOR_ADAPTIVE, mf.HYPERADAM_TENSOR_TREND
ANNEALED = mf.HYPERADAM_TENSOR_TREND_ANNEALED  # the trend rule at its annealed rate
SCALED = (ADAPTIVE, TREND, ANNEALED)  # the variants with the per-tensor step scale ℓ_T
TENSORWISE = (mf.HYPERADAM_TENSOR, mf.HYPERADAM_TENSOR_UNBOUNDED, *SCALED)
# The bounded variant and the scaled ones: the tests of the machinery (chunks, shards, adapters)
# run on all three, since the scaled variants' terms graphs also read the state (each its own).
BOUNDED = (mf.HYPERADAM_TENSOR, *SCALED)
# Several arrays: the first spans chunks at CHUNK = 256, the small ones share a packed chunk.
SHAPES = [(40, 30), (30,), (10, 40), (10,), (7, 3)]
SCALES = [1.0, 1e-4, 30.0, 1e-2, 1.0]  # each array's gradient scale
CHUNK = 256
# The runtime vs the fp32 reference over STEPS steps, per array and field (inf-norm relative),
# at least; see assert_matches_reference. Measured, every θ, array and field: ≤ 2.4e-5; the fp32
# reference's own distance from fp64 (the floor): ≤ 6.2e-5 for the bounded θ, ≤ 4.3e-3 for the
# ELU-weighted θ, whose dynamics amplify round-off.
TOLERANCE = 1e-4
STEPS = 25
FIELDS = ("h", "c", "m", "v", "b", "gamma", "feat_m", "feat_v")


def fields_of(method: str) -> tuple[str, ...]:
    """The per-coordinate state fields of a variant (the scaled ones add ``log_scale``)."""
    return tuple(f.name for f in mf.method_info(method).layout(num_candidates=20).fields)


def initial_params(seed: int) -> list[np.ndarray]:
    """Initial parameters, small enough (~0.05) that their own fp32 rounding (ulp(w)) stays far
    below the tolerance on the distance travelled (a few lr)."""
    rng = np.random.default_rng(seed)
    return [(0.05 * rng.normal(size=s)).astype(np.float32) for s in SHAPES]


def gradients(
    steps: int, seed: int = 0, shapes=SHAPES, scales=SCALES, *, persistent: bool = False
) -> list[list[np.ndarray]]:
    """Each array's gradients at its scale, coordinates spread over 10⁻¹…10¹ of it, 10 % exact
    zeros. ``persistent``: a fixed direction per array plus noise, the direction's sign flipping
    every step on the odd arrays, so that successive gradients agree (even arrays) or oppose
    (odd ones) and the scaled variants' step scale grows or shrinks; else white noise."""
    rng = np.random.default_rng(seed)
    if persistent:
        directions = [rng.normal(size=s) * 10.0 ** rng.uniform(-1, 1, s) for s in shapes]
    out = []
    for t in range(steps):
        grads = []
        for i, (shape, scale) in enumerate(zip(shapes, scales, strict=True)):
            if persistent:
                sign = -1.0 if i % 2 and t % 2 else 1.0
                g = scale * (sign * directions[i] + 0.5 * rng.normal(size=shape))
            else:
                g = rng.normal(size=shape) * scale * 10.0 ** rng.uniform(-1, 1, shape)
            g[rng.random(shape) < 0.1] = 0.0  # a few exact zeros
            grads.append(g.astype(np.float32))
        out.append(grads)
    return out


def reference(method: str, theta_path) -> tuple[TensorwiseHyperAdam, dict[str, torch.Tensor]]:
    artifact = load_theta(theta_path)
    _, ref = reference_for_theta(method, artifact.theta)
    assert isinstance(ref, TensorwiseHyperAdam)
    return ref, {k: torch.from_numpy(v) for k, v in artifact.theta.items()}


def reference_run(ref, theta, w0: list[np.ndarray], grads, lr: float, dtype=torch.float32):
    """The torch reference over the flat model, tensor layout = the arrays; returns each step's
    parameters (flat) and the final state."""
    sizes = [a.size for a in w0]
    w = torch.from_numpy(np.concatenate([a.ravel() for a in w0])).to(dtype)
    state = ref.init_state(w.numel(), tensor_sizes=sizes)
    state = type(state)(*(t.to(dtype) if t.is_floating_point() else t for t in state))
    theta = {k: v.to(dtype) for k, v in theta.items()}
    trajectory = []
    with torch.no_grad():
        for step in grads:
            g = torch.from_numpy(np.concatenate([a.ravel() for a in step])).to(dtype)
            delta, state = ref.step(theta, g, state, lr=lr)
            w = w + delta
            trajectory.append(w.numpy().copy())
    return trajectory, state


def reference_runs(ref, theta, w0, grads, lr):
    """The fp32 reference (what the runtime is compared with) and the fp64 one (how far fp32
    round-off alone carries the trajectory)."""
    return [
        reference_run(ref, theta, w0, grads, lr, dtype) for dtype in (torch.float32, torch.float64)
    ]


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def bounds(shapes=SHAPES) -> list[tuple[int, int]]:
    ends = np.cumsum([math.prod(s) for s in shapes])
    return list(zip([0, *ends[:-1]], ends, strict=True))


def state_arrays(state, fields) -> dict[str, np.ndarray]:
    """A reference state's per-coordinate fields as numpy arrays, keyed as the runtime's."""
    return {name: getattr(state, name).numpy() for name in fields}


def _errors(start, trajectory, state, want, want_state, lo, hi, fields) -> dict[str, float]:
    """Per field, over coordinates ``lo:hi``: the parameters at every step (``w0``, ``w1``, …,
    through the distance travelled) and each state field at the end, of ``trajectory``/``state``
    against ``want``/``want_state`` (inf-norm relative)."""
    errors = {
        f"w{t}": relative_error(got[lo:hi] - start[lo:hi], ref[lo:hi] - start[lo:hi])
        for t, (got, ref) in enumerate(zip(trajectory, want, strict=True))
    }
    for name in fields:
        got, ref = state[name][lo:hi], want_state[name][lo:hi]
        if name == "log_scale":
            # ℓ is a log: it acts (and is judged) as the step factor exp(ℓ). Relative to max|ℓ|
            # an ℓ near 0 (a sum of small cosines, each the cancelling sum of g·D) would
            # magnify an absolute round-off that moves the step by a few 1e-7 only.
            got, ref = np.exp(np.asarray(got, np.float64)), np.exp(np.asarray(ref, np.float64))
        errors[name] = relative_error(got, ref)
    return errors


def tolerances(w0, runs, shapes, fields=FIELDS) -> list[dict[str, float]]:
    """Per array, per field: ``max(TOLERANCE, 10 × floor)``, where the floor is that field's
    distance between the fp32 and the fp64 reference run from the same inputs (each step's
    parameters, each state field at the end)."""
    start = flat(w0)
    (want, want_state), (exact, exact_state) = runs
    want_state, exact_state = state_arrays(want_state, fields), state_arrays(exact_state, fields)
    return [
        {
            name: max(TOLERANCE, 10 * floor)
            for name, floor in _errors(
                start, want, want_state, exact, exact_state, lo, hi, fields
            ).items()
        }
        for lo, hi in bounds(shapes)
    ]


def assert_matches_reference(w0, trajectory_rt, state_rt, runs, shapes, fields=FIELDS):
    """Per array (so a small-scale array is judged on its own scale) and per field (the
    parameters at each step, each state field at the end): the runtime within
    ``max(TOLERANCE, 10 × the fp32 reference's own distance from fp64 on that field)`` of the
    fp32 reference, as the export parity check judges trajectories (a θ whose dynamics amplify
    round-off, like the ELU-weighted one, carries fp32 itself ~3e-4 from fp64 in a few
    steps)."""
    start = flat(w0)
    want, want_state = runs[0]
    limits = tolerances(w0, runs, shapes, fields)
    reference_state = state_arrays(want_state, fields)
    for (lo, hi), limit in zip(bounds(shapes), limits, strict=True):
        errors = _errors(start, trajectory_rt, state_rt, want, reference_state, lo, hi, fields)
        over = {k: (e, limit[k]) for k, e in errors.items() if not e <= limit[k]}
        assert not over, (lo, hi, over)
    assert state_rt[mf.STEP_COUNT].tolist() == want_state.t.tolist()


def test_the_floor_is_each_fields_own_fp32_round_off():
    """The floor compares the fp32 reference run with the fp64 one field by field: a field the
    fp32 run carries far from fp64 gets a wider tolerance than ``TOLERANCE``, and only that
    field; a field that agrees keeps ``TOLERANCE``."""
    w0 = [np.zeros(2, np.float32), np.zeros(3, np.float32)]
    exact_state = SimpleNamespace(v=torch.ones(5, dtype=torch.float64), m=torch.ones(5))
    rounded_state = SimpleNamespace(
        v=torch.tensor([1.0, 1.0, 1.0, 1.0, 1.01]), m=torch.ones(5)
    )  # v of array 1 1e-2 off
    exact = [np.ones(5)]
    limits = tolerances(
        w0, [(exact, rounded_state), (exact, exact_state)], [(2,), (3,)], ("v", "m")
    )
    assert limits[0] == {"w0": TOLERANCE, "v": TOLERANCE, "m": TOLERANCE}
    assert limits[1]["v"] == pytest.approx(10 * 0.01, rel=1e-6)
    assert limits[1]["w0"] == limits[1]["m"] == TOLERANCE


def test_layout_names_are_the_reference_state_fields():
    """runtime.manifest spells the layout without importing meta_train: it must be the
    reference's (the fields, then t carried; segment and segment_size are the tensor layout,
    which the runtime takes from the bound arrays)."""
    from meta_train.optimizers import hyperadam_tensor as ref_module

    assert ref_module.TensorwiseState._fields == (
        *mf.TENSORWISE_FIELDS,
        mf.STEP_COUNT,
        "segment",
        "segment_size",
        "log_scale",  # the adaptive variant's step scale; empty in these two variants
    )
    assert TensorwiseHyperAdam(20).init_state(7).log_scale.numel() == 0
    state = TensorwiseHyperAdam(20).init_state(7, tensor_sizes=[3, 4])
    layout = mf.tensorwise_layout(20)
    for field in layout.fields:
        assert tuple(getattr(state, field.name).shape) == (7, *field.shape), field
    assert [c.name for c in layout.carried] == [mf.STEP_COUNT]
    assert tuple(state.t.shape) == layout.carried[0].shape
    assert len(ref_module.FEATURE_BETAS) == mf.TENSORWISE_FEATURE_MOMENTA
    # the adaptive variant: the same fields and ℓ_T, one value per coordinate
    state = TensorwiseHyperAdam(20, adaptive_scale=True).init_state(7, tensor_sizes=[3, 4])
    layout = mf.tensorwise_layout(20, adaptive=True)
    assert [f.name for f in layout.fields] == [*mf.TENSORWISE_FIELDS, "log_scale"]
    for field in layout.fields:
        assert tuple(getattr(state, field.name).shape) == (7, *field.shape), field
    assert mf.method_info(ADAPTIVE).layout(num_candidates=20) == layout
    # the trend variant: the adaptive one's layout; the same choices of the cosine's reference
    assert mf.method_info(TREND).layout(num_candidates=20) == layout
    assert mf.method_info(ANNEALED) == mf.method_info(TREND)  # the rate lives in the step graph
    assert set(mf.TENSORWISE_SCALE_REFERENCES) == set(ref_module.SCALE_REFERENCES)
    assert mf.TENSORWISE_TREND_TERMS_STATE == ("feat_m",)
    assert ref_module.FEATURE_BETAS[ref_module.TREND_FEATURE] == 0.99


@pytest.mark.parametrize("method", TENSORWISE)
def test_export_records_the_variant(tensorwise_folders, tensorwise_theta, method):
    folder = tensorwise_folders[method]
    manifest = mf.load_manifest(folder)
    adaptive = method in SCALED
    assert manifest.method == method and manifest.config == {"num_candidates": 20}
    assert set(manifest.graphs) == {mf.ARRAY_TERMS, mf.FUSED}
    assert manifest.state == mf.tensorwise_layout(20, adaptive=adaptive)
    assert manifest.state.bytes_per_coordinate == 4 * (6 * 20 + 3 + 1 + adaptive)
    raw = manifest.to_json()
    statistics = raw["per_array_statistics"]
    terms_inputs = [t.name for t in manifest.graphs[mf.ARRAY_TERMS].inputs]
    if method == ADAPTIVE:  # the cosine's three sums after rms_T(g)²; the terms graph reads D's
        assert statistics["terms"] == ["grad_sq", "grad_sq_sum", "grad_dot_last_step_sum",
                                       "last_step_sq_sum"]  # fmt: skip
        assert statistics["summed"] == statistics["terms"][1:]
        assert terms_inputs == [mf.GRAD, "h", "m", "v", "b", "gamma"]
    elif method in (TREND, ANNEALED):  # the same with the trend y, which is a row of feat_m
        assert statistics["terms"] == ["grad_sq", "grad_sq_sum", "grad_dot_trend_sum",
                                       "trend_sq_sum"]  # fmt: skip
        assert statistics["summed"] == statistics["terms"][1:]
        assert terms_inputs == [mf.GRAD, "feat_m"]
    else:  # as before summed statistics existed
        assert statistics["terms"] == ["grad_sq"] and "summed" not in statistics
    assert statistics["input"] == mf.ARRAY_MEANS
    assert manifest.parity["passed"] is True
    assert {mf.GRAPH_FILES[mf.ARRAY_TERMS], mf.GRAPH_FILES[mf.FUSED]} <= set(manifest.files)
    # the paper variant's manifest does not carry the key (its bytes are as before)
    assert (
        "per_array_statistics"
        not in mf.Manifest(**{**manifest.__dict__, "method": mf.HYPERADAM}).to_json()
    )


@pytest.mark.parametrize("method", TENSORWISE)
def test_runtime_follows_the_torch_reference_over_many_steps(
    tensorwise_folders, tensorwise_theta, method
):
    ref, theta = reference(method, tensorwise_theta[method])
    opt = runtime.load(tensorwise_folders[method], threads=2)
    w0 = initial_params(1)
    adaptive = method in SCALED
    grads = gradients(STEPS, persistent=adaptive)
    params = [a.copy() for a in w0]
    stepper = opt.bind(params, chunk_size=CHUNK)
    assert stepper.num_chunks >= 5 and stepper.uses_fused_graph
    trajectory = []
    for step in grads:
        assert stepper.step(step)
        trajectory.append(flat(params))
    runs = reference_runs(ref, theta, w0, grads, opt.default_lr)
    state = stepper.state_dict()["state"]
    assert_matches_reference(w0, trajectory, state, runs, SHAPES, fields_of(method))
    if adaptive:  # ℓ_T: one value per array; up where gradients agree, down where they flip
        ends = [state["log_scale"][lo] for lo, _ in bounds()]
        for (lo, hi), end in zip(bounds(), ends, strict=True):
            np.testing.assert_array_equal(state["log_scale"][lo:hi], end)
        assert min(ends[0::2]) > 1.0 and max(ends[1::2]) < -0.1, ends


@pytest.mark.parametrize("method", BOUNDED)
def test_one_chunk_and_many_chunks_agree(tensorwise_folders, method):
    """An array's statistic summed over several chunks equals its one-chunk value (to the
    rounding of one float32 mean)."""
    opt = runtime.load(tensorwise_folders[method], threads=1)
    w0 = initial_params(2)
    grads = gradients(5)
    results = []
    for chunk_size in (10_000, CHUNK, 37):
        params = [a.copy() for a in w0]
        stepper = opt.bind(params, chunk_size=chunk_size)
        for step in grads:
            stepper.step(step)
        results.append((flat(params), stepper.state_dict()["state"], stepper.num_chunks))
    assert results[0][2] == 1 and results[1][2] > 5 and results[2][2] > 30
    for w, state, _ in results[1:]:
        np.testing.assert_allclose(w - flat(w0), results[0][0] - flat(w0), rtol=0, atol=1e-6)
        for name in fields_of(method):
            np.testing.assert_allclose(state[name], results[0][1][name], rtol=2e-5, atol=1e-30)


def _sharded(opt, w0, grads, layout, chunk_size):
    """Shards as threads: ``layout[r]`` lists (array, lo, hi) element ranges of shard r."""
    flat_w0 = [a.ravel() for a in w0]

    def shard(rank):
        def run(all_reduce):
            params = [flat_w0[i][lo:hi].copy() for i, lo, hi in layout[rank]]
            stepper = opt.bind(
                params,
                chunk_size=chunk_size,
                all_reduce=all_reduce,
                array_ids=[i for i, _, _ in layout[rank]],
                num_arrays=len(w0),
            )
            for step in grads:
                stepper.step([step[i].ravel()[lo:hi].copy() for i, lo, hi in layout[rank]])
            return params

        return run

    results = run_shards([shard(r) for r in range(len(layout))])
    out = [a.ravel().copy() for a in w0]
    for rank, params in enumerate(results):
        for (i, lo, hi), p in zip(layout[rank], params, strict=True):
            out[i][lo:hi] = p
    return out


@pytest.mark.parametrize("method", BOUNDED)
def test_sharded_equals_unsharded(tensorwise_folders, method):
    """Two shards, one array split across both (its rms, and the adaptive variant's cosine, are
    reduced across shards), the others on one shard each: the same parameters as one
    unsharded stepper."""
    opt = runtime.load(tensorwise_folders[method], threads=1)
    w0 = initial_params(3)
    grads = gradients(6, seed=3)
    layout = [
        [(0, 0, 500), (2, 0, 400), (4, 0, 21)],
        [(0, 500, 1200), (1, 0, 30), (3, 0, 10)],
    ]
    sharded = _sharded(opt, w0, grads, layout, chunk_size=128)
    whole = [a.copy() for a in w0]
    stepper = opt.bind(whole, chunk_size=128)
    for step in grads:
        stepper.step(step)
    for got, want, start in zip(sharded, whole, w0, strict=True):
        # the float64 sums add in another order across shards: float32 means may differ by
        # an ulp
        np.testing.assert_allclose(got - start.ravel(), want.ravel() - start.ravel(), atol=1e-6)
    # and it is a per-array statistic, not a per-shard one: array 0 on one shard as a whole
    alone = _sharded(opt, w0, grads, [[(0, 0, 500)], [(0, 500, 1200)]], chunk_size=128)
    solo = [w0[0].copy()]
    stepper = opt.bind(solo, chunk_size=128)
    for step in grads:
        stepper.step([step[0]])
    np.testing.assert_allclose(alone[0], solo[0].ravel(), rtol=0, atol=1e-6)


def test_sharded_needs_array_ids(tensorwise_folders):
    opt = runtime.load(tensorwise_folders["hyperadam-tensor"], threads=1)
    w = [np.zeros(4, np.float32)]
    with pytest.raises(ValueError, match=r"sharded hyperadam-tensor step needs array_ids"):
        opt.bind(w, all_reduce=lambda x: x)
    with pytest.raises(ValueError, match=r"needs num_arrays"):
        opt.bind(w, all_reduce=lambda x: x, array_ids=[0])
    with pytest.raises(ValueError, match=r"array_ids must be below num_arrays = 1"):
        opt.bind(w, array_ids=[1], num_arrays=1)
    with pytest.raises(ValueError, match=r"one id per parameter \(1\), got 2"):
        opt.bind(w, array_ids=[0, 1])


def test_pieces_of_one_tensor_with_one_id_step_as_the_tensor(tensorwise_folders):
    """``array_ids`` also joins local arrays: two views of one tensor bound with the same id
    take the whole tensor's statistic, so they step as the tensor bound whole."""
    opt = runtime.load(tensorwise_folders[mf.HYPERADAM_TENSOR], threads=1)
    w0 = initial_params(10)[0].ravel()
    grads = [step[0].ravel() for step in gradients(5, seed=10)]
    whole = w0.copy()
    pieces = [w0[:700].copy(), w0[700:].copy()]
    one = opt.bind([whole], chunk_size=CHUNK)
    two = opt.bind(pieces, chunk_size=CHUNK, array_ids=[0, 0])
    apart = [w0[:700].copy(), w0[700:].copy()]
    separate = opt.bind(apart, chunk_size=CHUNK)  # default: two tensors, two statistics
    for g in grads:
        one.step([g])
        two.step([g[:700].copy(), g[700:].copy()])
        separate.step([g[:700].copy(), g[700:].copy()])
    np.testing.assert_allclose(np.concatenate(pieces) - w0, whole - w0, rtol=0, atol=1e-7)
    assert np.abs(np.concatenate(apart) - whole).max() > 1e-5


@pytest.mark.parametrize("method", TENSORWISE)
def test_zero_gradients_stay_finite(tensorwise_folders, tensorwise_theta, method):
    """A zero coordinate, a whole zero array (rms_T = 0: feature 0, not 0/0) and an all-zero
    step: finite state and parameters; from a fresh state a zero array does not move, and the
    runtime still follows the reference."""
    ref, theta = reference(method, tensorwise_theta[method])
    opt = runtime.load(tensorwise_folders[method], threads=1)
    w0 = initial_params(4)
    grads = gradients(8, seed=4)
    for step in grads:
        step[1][:] = 0.0  # a whole array, always
        step[0][3, 4] = 0.0  # a coordinate
    grads[5] = [np.zeros_like(g) for g in grads[5]]  # everything, once
    params = [a.copy() for a in w0]
    stepper = opt.bind(params, chunk_size=CHUNK)
    trajectory = []
    for step in grads:
        assert stepper.step(step)
        trajectory.append(flat(params))
        assert all(np.isfinite(p).all() for p in params)
    state = stepper.state_dict()["state"]
    assert all(np.isfinite(v).all() for v in state.values())
    np.testing.assert_array_equal(params[1], w0[1])  # never had a gradient: never moves
    runs = reference_runs(ref, theta, w0, grads, opt.default_lr)
    assert_matches_reference(w0, trajectory, state, runs, SHAPES, fields_of(method))

    fresh = [np.ones(5, np.float32)]
    stepper = opt.bind(fresh, chunk_size=CHUNK)
    for _ in range(3):
        assert stepper.step([np.zeros(5, np.float32)])
    np.testing.assert_array_equal(fresh[0], np.ones(5, np.float32))
    assert all(np.isfinite(v).all() for v in stepper.state_dict()["state"].values())


@pytest.mark.parametrize("method", TENSORWISE)
def test_scaling_one_arrays_gradient_changes_only_its_moments(
    tensorwise_folders, tensorwise_theta, method
):
    """g → 1000·g on array A: A's features (g/rms_A(g), m̂/√v̂, progress) are unchanged, so are
    its cells, gates and step (and the scaled variants' cos_A(g, D) or cos_A(g, trend), so ℓ_A);
    only its raw
    moments scale (m, feat_m by 10³, v, feat_v by 10⁶). The other arrays see nothing of it
    (bitwise)."""
    opt = runtime.load(tensorwise_folders[method], threads=1)
    w0 = initial_params(5)
    grads = gradients(10, seed=5, persistent=method in SCALED)
    scaled = [[g * np.float32(1e3) if i == 2 else g for i, g in enumerate(s)] for s in grads]
    runs = []
    for sequence in (grads, scaled):
        params = [a.copy() for a in w0]
        stepper = opt.bind(params, chunk_size=CHUNK)
        for step in sequence:
            stepper.step(step)
        runs.append((flat(params), stepper.state_dict()["state"]))
    (w_a, s_a), (w_b, s_b) = runs
    lo, hi = bounds()[2]
    others = np.r_[0:lo, hi : w_a.size]
    np.testing.assert_array_equal(w_b[others], w_a[others])
    for name in fields_of(method):
        np.testing.assert_array_equal(s_b[name][others], s_a[name][others])
    start = flat(w0)[lo:hi]
    assert relative_error(w_b[lo:hi] - start, w_a[lo:hi] - start) < 1e-4
    factors = {"h": 1, "c": 1, "b": 1, "gamma": 1, "m": 1e3, "feat_m": 1e3, "v": 1e6,
               "feat_v": 1e6, "log_scale": 1}  # fmt: skip
    for name in fields_of(method):
        factor = factors[name]
        assert relative_error(s_b[name][lo:hi] / factor, s_a[name][lo:hi]) < 1e-4, name
    if method in SCALED:
        assert np.abs(s_a["log_scale"][lo:hi]).min() > 0.5  # ℓ_A moved, and alike


def adam(w0: np.ndarray, grads: list[np.ndarray], lr: float, b1=0.9, b2=0.999, eps=1e-24):
    """Adam in float64 with ε inside the root, as the Adam reduction makes the step."""
    w, m, v = w0.astype(np.float64), np.zeros(w0.size), np.zeros(w0.size)
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        bias1, bias2 = 1 - b1**t, 1 - b2**t
        w = w - lr * (m / (bias1 + eps)) / np.sqrt(v / (bias2 + eps) + eps)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("variant", ["bounded", "unbounded", "adaptive", "trend", "annealed"])
def test_adam_reduction_start_is_adam(tmp_path, variant):
    """θ reduced to Adam(1e-3) exports and steps, through chunks, as Adam to fp32 round-off
    (the scaled variants' with κ = 0, and κ₀ = 0: the step scale stays exp(±κ·t) ≈ 1 to
    1e-17)."""
    scaled = variant in ("adaptive", "trend", "annealed")
    rule = TensorwiseHyperAdam(
        20,
        bounded=variant != "unbounded",
        adaptive_scale=scaled,
        scale_reference="trend" if variant in ("trend", "annealed") else "step",
        anneal_rate=variant == "annealed",
    )
    extra = {"scale_rate": 0.0} if scaled else {}
    if variant == "annealed":
        extra["early_scale_rate"] = 0.0
    theta = rule.adam_reduction(rule.init_theta(generator(0)), lr=1e-3, **extra)
    method = rule.name
    export_optimizer(method, theta, tmp_path / "adam", parity_sizes=(2,), trajectory_steps=3)
    opt = runtime.load(tmp_path / "adam", threads=1)
    assert opt.default_lr == rule.default_lr
    # w0 = 0: the parameters stay ~1e-2, so their own fp32 rounding stays far below the tolerance
    w0 = [np.zeros(s, np.float32) for s in SHAPES]
    grads = gradients(STEPS, seed=6)
    params = [a.copy() for a in w0]
    stepper = opt.bind(params, chunk_size=CHUNK)
    got = []
    for step in grads:
        stepper.step(step)
        got.append(flat(params))
    want = adam(flat(w0), [flat(s) for s in grads], lr=1e-3)
    start = flat(w0)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        # per coordinate, the update is ≤ ~lr; γ = σ(logit 0.999) in fp32 carries 1 − γ to
        # ~3e-5 relative, so Adam's v̂ (and the step, through √) to ~1.5e-5
        np.testing.assert_allclose(g - start, w - start, rtol=0, atol=1e-3 * (t + 1) * 5e-5)


# -- the adapters: torch.optim, optax, the guard ---------------------------------------------


@pytest.mark.parametrize("method", BOUNDED)
def test_torch_optimizer_with_param_groups_follows_the_reference(
    tensorwise_folders, tensorwise_theta, method
):
    """``runtime.torch.LearnedOptimizer`` over two param groups (the second at twice the lr):
    every parameter is its own array; the state is the reference's and the second group moves
    twice as far (the state, the scaled variants' ℓ included, does not depend on lr)."""
    from runtime.torch import LearnedOptimizer

    ref, theta = reference(method, tensorwise_theta[method])
    opt = runtime.load(tensorwise_folders[method], threads=1)
    w0 = initial_params(7)
    grads = gradients(STEPS, seed=7)
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in w0]
    lr = opt.default_lr
    optimizer = LearnedOptimizer(
        [{"params": params[:2]}, {"params": params[2:], "lr": 2 * lr}], opt, chunk_size=CHUNK
    )
    trajectory = []
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = torch.from_numpy(g.copy())
        optimizer.step()
        trajectory.append(flat([p.detach().numpy() for p in params]))
    runs = reference_runs(ref, theta, w0, grads, lr)
    state = optimizer.stepper.state_dict()["state"]
    split = bounds()[2][0]  # the second group starts at array 2
    doubled = [np.concatenate([t[:split], flat(w0)[split:] + (t[split:] - flat(w0)[split:]) / 2])
               for t in trajectory]  # fmt: skip
    assert_matches_reference(w0, doubled, state, runs, SHAPES, fields_of(method))

    # its state_dict (t carried beside the per-parameter fields) resumes exactly
    saved = optimizer.state_dict()
    assert saved["hyperadam_runtime"]["carried"][mf.STEP_COUNT].tolist() == [float(STEPS)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = LearnedOptimizer(
        [{"params": copies[:2]}, {"params": copies[2:], "lr": 2 * lr}], opt, chunk_size=CHUNK
    )
    resumed.load_state_dict(saved)
    for group in (params, copies):
        for p, g in zip(group, grads[0], strict=True):
            p.grad = torch.from_numpy(g.copy())
    optimizer.step()
    resumed.step()
    for a, b in zip(params, copies, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", BOUNDED)
def test_jax_transformation_equals_the_stepper(tensorwise_folders, method):
    """``runtime.jax.learned_optimizer`` (jitted, one leaf per array) takes the numpy stepper's
    steps, so it follows the reference as the stepper does."""
    jax = pytest.importorskip("jax")
    from runtime.jax import learned_optimizer

    opt = runtime.load(tensorwise_folders[method], threads=1)
    w0 = initial_params(8)
    grads = gradients(STEPS, seed=8)
    names = [f"a{i}" for i in range(len(SHAPES))]  # jax flattens a dict in key order
    tx = learned_optimizer(opt, chunk_size=CHUNK)
    p = {n: jax.numpy.asarray(a) for n, a in zip(names, w0, strict=True)}
    state = tx.init(p)
    update = jax.jit(tx.update)
    unguarded = []
    for step in grads:
        updates, state = update(
            {n: jax.numpy.asarray(g) for n, g in zip(names, step, strict=True)}, state
        )
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
        unguarded.append(p)
    arrays = [a.copy() for a in w0]
    stepper = opt.bind(arrays, chunk_size=CHUNK)
    for step in grads:
        stepper.step(step)
    for n, want in zip(names, arrays, strict=True):
        np.testing.assert_allclose(np.asarray(p[n]), want, rtol=0, atol=1e-7)

    # guarded (jitted), with a falling loss: the same steps; a NaN loss then restores
    guarded = learned_optimizer(opt, chunk_size=CHUNK, guard=True)
    q = {n: jax.numpy.asarray(a) for n, a in zip(names, w0, strict=True)}
    state = guarded.init(q)
    update = jax.jit(guarded.update)
    for t, step in enumerate(grads):
        loss = jax.numpy.nan if t == len(grads) - 1 else 1.0 / (t + 1)
        g = {n: jax.numpy.asarray(a) for n, a in zip(names, step, strict=True)}
        updates, state = update(g, state, q, loss=loss)
        q = jax.tree_util.tree_map(lambda a, u: a + u, q, updates)
        if t == len(grads) - 2:
            for n in names:  # the unguarded steps so far
                np.testing.assert_array_equal(np.asarray(q[n]), np.asarray(unguarded[t][n]))
    from runtime.jax import num_fallbacks

    assert num_fallbacks(state) == 1
    assert all(np.isfinite(np.asarray(v)).all() for v in q.values())


@pytest.mark.parametrize("method", BOUNDED)
def test_guarded_stepper_steps_as_the_stepper_and_restores_the_step_count(
    tensorwise_folders, method
):
    """With a falling loss the guard changes nothing (bitwise); a blow-up restores the last good
    parameters and state, the step count t (and the scaled variants' ℓ) included, and runs
    Adam."""
    opt = runtime.load(tensorwise_folders[method], threads=1)
    w0 = initial_params(9)
    grads = gradients(12, seed=9)
    plain, guarded = [a.copy() for a in w0], [a.copy() for a in w0]
    stepper = opt.bind(plain, chunk_size=CHUNK)
    watched = opt.bind(guarded, chunk_size=CHUNK, guard=True, guard_hook=None)
    for t, step in enumerate(grads[:10]):
        stepper.step(step)
        assert watched.step(step, loss=1.0 / (t + 1))
    for a, b in zip(plain, guarded, strict=True):
        np.testing.assert_array_equal(a, b)
    saved = watched.state_dict()["state"]
    np.testing.assert_array_equal(saved[mf.STEP_COUNT], [10.0])
    assert not watched.step(grads[10], loss=float("nan"))  # restore to the last snapshot
    assert watched.num_fallbacks == 1
    # the last snapshot (GuardConfig.snapshot_every = 10) is the start: t and w back to it
    assert watched.state_dict()["state"][mf.STEP_COUNT].tolist() == [0.0]
    if method in SCALED:  # ℓ had moved; back to the start's 0
        assert np.abs(saved["log_scale"]).max() > 0
        assert not watched.state_dict()["state"]["log_scale"].any()
    for a, b in zip(guarded, w0, strict=True):
        np.testing.assert_array_equal(a, b)
    assert watched.step(grads[11], loss=0.05)  # Adam
    assert watched.num_adam_steps == 1
    assert all(np.isfinite(a).all() for a in guarded)


# -- the scaled variants' step scale ------------------------------------------------------------


def _bound_at(opt, state, sizes, chunk_size):
    """A stepper over zero parameters of ``sizes`` holding the reference state ``state``."""
    from export.parity import to_runtime_state

    params = [np.zeros(n, np.float32) for n in sizes]
    stepper = opt.bind(params, chunk_size=chunk_size)
    saved = stepper.state_dict()
    saved["state"] = to_runtime_state(opt.manifest.state, state)
    stepper.load_state_dict(saved)
    return stepper, params


@pytest.mark.parametrize("method", SCALED)
def test_the_step_scale_stops_at_its_bounds(tensorwise_folders, tensorwise_theta, method):
    """ℓ near ±log SCALE_MAX with gradients that keep agreeing (array 0: ℓ grows) or keep
    flipping (array 1: ℓ shrinks): the runtime clips at exactly ±log 100 in fp32, as the
    reference, step by step, through chunks smaller than the arrays."""
    ref, theta = reference(method, tensorwise_theta[method])
    opt = runtime.load(tensorwise_folders[method], threads=1)
    sizes = [300, 200]
    rng = np.random.default_rng(11)
    base = [rng.normal(size=n) for n in sizes]
    grads = [[(b * (1.0 if i == 0 else (-1.0) ** t) + 0.1 * rng.normal(size=b.size)).astype(
        np.float32) for i, b in enumerate(base)] for t in range(10)]  # fmt: skip
    state = ref.init_state(sum(sizes), tensor_sizes=sizes)
    state = state._replace(log_scale=torch.cat([torch.full((300,), 4.5), torch.full((200,), -4.5)]))
    stepper, params = _bound_at(opt, state, sizes, chunk_size=128)
    w = torch.zeros(sum(sizes))
    with torch.no_grad():
        for step in grads:
            assert stepper.step(step)
            delta, state = ref.step(theta, torch.from_numpy(flat(step)), state, lr=opt.default_lr)
            w = w + delta
            got = stepper.state_dict()["state"]["log_scale"]
            np.testing.assert_allclose(got, state.log_scale.numpy(), rtol=0, atol=1e-6)
            assert relative_error(flat(params), w.numpy()) < TOLERANCE
    limit = np.float32(math.log(100.0))
    np.testing.assert_array_equal(got, np.r_[np.full(300, limit), np.full(200, -limit)])
    np.testing.assert_array_equal(got, state.log_scale.numpy())


@pytest.mark.parametrize("method", SCALED)
def test_the_cosine_adds_its_epsilon_to_the_product_of_the_norms(
    tensorwise_folders, tensorwise_theta, method
):
    """Tiny gradients (1e-17) and previous directions (moments 1e-25; the trend variant's
    trend y ~1e-15, along g): ‖g‖·‖D‖ is ~100 × 1e-30, so where 1e-30 is added matters. The
    runtime's summed statistics give the reference's cos = Σg·D / (‖g‖‖D‖ + 1e-30) (ℓ to
    1e-7); per-array means would add 1e-30 to ‖g‖‖D‖/n and move ℓ by half."""
    ref, theta = reference(method, tensorwise_theta[method])
    opt = runtime.load(tensorwise_folders[method], threads=1)
    sizes, rng = [100, 60], np.random.default_rng(12)
    p, j = sum(sizes), 20

    def f32(a) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, np.float32))

    state = ref.init_state(p, tensor_sizes=sizes)._replace(
        h=f32(rng.uniform(-0.9, 0.9, (p, j))),
        c=f32(rng.normal(size=(p, j))),
        m=f32(rng.normal(size=(p, j)) * 1e-25),  # v = 0: gradients whose squares underflowed
        b=f32(rng.uniform(0.05, 1.0, (p, j))),
        gamma=f32(rng.uniform(0.05, 1.0, (p, j))),
        feat_m=f32(rng.normal(size=(p, 3)) * 1e-17),
        feat_v=f32(rng.uniform(0.5, 2.0, (p, 1)) * 1e-34),
        t=torch.full((1,), 5.0),
    )
    g = (rng.normal(size=p) * 1e-17).astype(np.float32)
    if method in (TREND, ANNEALED):
        # y = 100 (g + noise): cos(g, y) ≈ 0.7 but for the ε, ‖g‖‖y‖ ~ 1e-30
        feat_m = state.feat_m.clone()
        feat_m[:, TREND_FEATURE] = f32(100 * (g + rng.normal(size=p) * 1e-17))
        state = state._replace(feat_m=feat_m)
    stepper, params = _bound_at(opt, state, sizes, chunk_size=64)
    assert stepper.step([g[:100].copy(), g[100:].copy()])
    with torch.no_grad():
        delta, want = ref.step(theta, torch.from_numpy(g), state, lr=opt.default_lr)
    got = stepper.state_dict()["state"]["log_scale"]
    assert np.abs(want.log_scale.numpy()).min() > 0.01  # the cosine is not ~0
    np.testing.assert_allclose(got, want.log_scale.numpy(), rtol=1e-5, atol=0)
    assert relative_error(flat(params), delta.numpy()) < 1e-5


def test_the_trend_scale_follows_the_gradients_trend_not_the_last_step(
    tensorwise_folders, tensorwise_theta
):
    """Twenty steps along +d, then ten along −d (two arrays, each its own d): four steps after
    the turn the last step direction D has turned with the gradient (cos(g, D) > 0.2: the
    adaptive rule would grow ℓ) while the β = 0.99 trend still points along +d (cos(g, y) <
    −0.5). The runtime's ℓ, chunked, follows the trend's cosine down, as the reference's, step
    by step; a terms graph that read D, or another row of feat_m, would not."""
    from meta_train.optimizers import hyperadam_tensor as ref_module

    ref, theta = reference(TREND, tensorwise_theta[TREND])
    opt = runtime.load(tensorwise_folders[TREND], threads=1)
    sizes, rng = [300, 200], np.random.default_rng(13)
    d = [rng.normal(size=n) for n in sizes]
    grads = [[((1.0 if t < 20 else -1.0) * x + 0.3 * rng.normal(size=x.size)).astype(np.float32)
              for x in d] for t in range(30)]  # fmt: skip
    params = [np.zeros(n, np.float32) for n in sizes]
    stepper = opt.bind(params, chunk_size=128)
    state = ref.init_state(sum(sizes), tensor_sizes=sizes)
    with torch.no_grad():
        for t, step in enumerate(grads):
            g = torch.from_numpy(flat(step))
            previous = ref_module.candidate_directions(state.m, state.v, state.b, state.gamma)
            cosines = {
                reference: ref_module.tensor_cosine(
                    g,
                    ref_module.scale_reference_direction(
                        theta, state, previous, bounded=True, reference=reference
                    ),
                    state.segment,
                    len(sizes),
                ).numpy()
                for reference in ("step", "trend")
            }
            before = state.log_scale.numpy()
            _, state = ref.step(theta, g, state, lr=opt.default_lr)
            assert stepper.step(step)
            got = stepper.state_dict()["state"]["log_scale"]
            np.testing.assert_allclose(got, state.log_scale.numpy(), rtol=0, atol=1e-6)
            if t >= 26:  # the two rules disagree: ℓ follows the trend's cosine down
                assert cosines["step"].min() > 0.2 and cosines["trend"].max() < -0.5, cosines
                assert (got < before - 0.05).all()
