"""The parity check every export runs: the runtime on the exported graphs vs the torch reference.

Both sides start from the same state and gradient; the runtime runs through ``runtime.load`` on
the folder being exported, so the check covers the graphs, the chunk plan, the in-place buffer
binding and the reductions between chunks exactly as users run them.

Cases (each through the fused path and through several chunks):

* one step from a random, realistic state with a real-ish gradient (magnitudes spread over
  1e-6…1e-1, 20 % exact zeros, and coordinates whose whole state is zero as for dead units), and
  one step with an all-zero gradient, for every size in ``sizes`` (2, 1 000, optionally 10⁶);
* a trajectory of ``steps`` steps on a small ReLU MLP (several arrays, so packed chunks too),
  each side following its own parameters and gradients.

A method with per-array statistics (the tensor-wise HyperAdam: ``reference.per_tensor``) is
checked on several arrays of different sizes and gradient scales in each step case, the
reference given the same tensor layout (``init_state(p, tensor_sizes=...)``), and also through
a sharded path: two shards in two threads (an in-process all-reduce), every array split
across both, so each per-array statistic is reduced across chunks and across shards.

Metric: for every tensor, ``max |runtime − reference| / max |reference|`` (∞-norm relative
error); for the parameters, of the update ``w' − w`` in a step and of the distance travelled
``w_T − w_0`` in a trajectory. Non-finite output is an infinite error.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

import runtime
from meta_train.optimizers import LearnedUpdateRule
from runtime import manifest as mf
from runtime.plan import DEFAULT_CHUNK_SIZE
from runtime.stepper import AllReduce

# fp32 round-off scale: one step agrees to ≤ 3e-7 (measured for all three methods up to 10⁶
# coordinates, fused and chunked); the tolerance leaves ~60× headroom.
STEP_TOLERANCE = 2e-5
# A trajectory compounds round-off over its steps (each side follows its own iterates); the
# tolerance grows with the measured fp32-vs-fp64 drift of the trajectory (``trajectory_cases``).
TRAJECTORY_TOLERANCE = 1e-4
METRIC = (
    "max|runtime - torch reference| / max|torch reference| per tensor (inf-norm relative); "
    "parameters compared through the update w'-w (one step) or w_T-w_0 (trajectory)"
)


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """The reference runs many tiny ops; torch's intra-op threads only add synchronisation
    (30× slower on a busy 2-core machine). Restores the caller's setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ParityError(RuntimeError):
    """The exported graphs disagree with the torch reference beyond the stated tolerance."""


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if not np.isfinite(actual).all():
        return math.inf
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(actual - expected).max(initial=0.0) / scale)


def to_runtime_state(
    layout: mf.StateLayout, state: Any, *, dtype: type = np.float32
) -> dict[str, np.ndarray]:
    """A reference state NamedTuple → the runtime's ``state_dict()["state"]`` entries."""
    values = {name: t.detach().numpy().astype(dtype) for name, t in state._asdict().items()}
    out = {f.name: values[f.name] for f in layout.fields}
    for carried in layout.carried:
        if carried.name == mf.M_COL_SUM_SQ:  # derived: Σ_rows M² per column, as the reference
            out[carried.name] = state.m.square().sum(dim=0).numpy().astype(dtype)
        else:
            out[carried.name] = values[carried.name].reshape(carried.shape)
    return out


# Reference state entries that are the tensor layout, not state: kept as ``init_state`` made them.
_LAYOUT_ENTRIES = ("segment", "segment_size")


def init_reference_state(
    reference: LearnedUpdateRule, p: int, tensor_sizes: Sequence[int] | None = None
) -> Any:
    """``reference.init_state(p)``, given the tensor layout when the method reads one."""
    if getattr(reference, "per_tensor", False):
        return reference.init_state(p, tensor_sizes=tensor_sizes)  # type: ignore[call-arg]
    return reference.init_state(p)


def random_state(
    reference: LearnedUpdateRule,
    p: int,
    rng: np.random.Generator,
    tensor_sizes: Sequence[int] | None = None,
) -> Any:
    """A state a few steps into training: bounded LSTM states, positive second moments,
    bias accumulators in (0, 1], and ~10 % of coordinates with an all-zero state."""
    state = init_reference_state(reference, p, tensor_sizes)
    fresh = {}
    for name, zeros in state._asdict().items():
        shape = tuple(zeros.shape)
        if name in _LAYOUT_ENTRIES or zeros.numel() == 0:  # layout, or a field not in use
            fresh[name] = zeros
            continue
        if name in ("h", "h1", "h2"):
            value = rng.uniform(-0.95, 0.95, shape)
        elif name in ("c", "c1", "c2"):
            value = rng.normal(0.0, 1.0, shape)
        elif name in ("m", "feat_m"):
            value = rng.normal(0.0, 1.0, shape) * 10.0 ** rng.uniform(-5, -1, shape)
        elif name in ("v", "feat_v"):
            value = rng.normal(0.0, 1.0, shape) ** 2 * 10.0 ** rng.uniform(-10, -2, shape)
        elif name in ("b", "gamma"):
            value = rng.uniform(0.05, 1.0, shape)
        elif name == "log_scale":  # the adaptive variant's step scale, within ±log 100
            value = rng.uniform(-4.0, 4.0, shape)
        elif name in (mf.STEP, mf.STEP_COUNT):
            value = np.full(shape, 7.0)
        else:
            raise ValueError(f"no random state rule for field {name!r}")
        if name not in (mf.STEP, mf.STEP_COUNT):
            value[rng.random(p) < 0.1] = 0.0
        fresh[name] = torch.from_numpy(np.asarray(value, np.float32))
    if getattr(state, "log_scale", torch.zeros(0)).numel():
        _without_moments_before_any_step(fresh)
    return type(state)(**fresh)  # the state's own NamedTuple


def _without_moments_before_any_step(fresh: dict[str, torch.Tensor]) -> None:
    """Zeroes m and v where the bias accumulators (or v) say no gradient was ever seen.

    The adaptive tensor-wise variant recomputes the previous direction M̂ = (m/B)/√(v/Γ + ε)
    of the incoming state unclipped (its step scale reads cos(g, Σ_j ρ_j M̂_j)). The fields
    zeroed independently above give pairs no step can reach (m ≠ 0 with B = 0: M̂ ~ 1e33, whose
    square overflows fp32 and makes the reference's cosine 0 · ∞); a real coordinate with B = 0
    or Γ = 0 has taken no step and one with v = 0 has seen only zero gradients, so m = v = 0
    there. Only for the variants with a step scale (state field ``log_scale``: the adaptive one
    and the trend one, whose state is the same): the other methods' parity records stay as they
    were.
    """
    unseen = (fresh["b"] == 0) | (fresh["gamma"] == 0) | (fresh["v"] == 0)
    fresh["m"] = torch.where(unseen, 0.0, fresh["m"])
    fresh["v"] = torch.where(unseen, 0.0, fresh["v"])


def real_gradient(p: int, rng: np.random.Generator) -> np.ndarray:
    g = rng.normal(0.0, 1.0, p) * 10.0 ** rng.uniform(-6, -1, p)
    g[rng.random(p) < 0.2] = 0.0
    return g.astype(np.float32)


def array_sizes(p: int) -> list[int]:
    """How a per-array method's step case of p coordinates is cut into arrays: 1 + 1 for p = 2,
    else three arrays of 50 %, 30 % and 20 % (each with its own gradient scale)."""
    if p < 3:
        return [1] * p
    first, second = p // 2, (3 * p) // 10
    return [first, second, p - first - second]


# Gradient scale of each array in a per-array step case: rms_T(g) differs by 10⁵ between them.
ARRAY_SCALES = (1.0, 1e-3, 1e2)


class ThreadAllReduce:
    """An ``all_reduce`` for shards that are threads of one process: ``for_rank(r)`` is shard
    r's. Sums in rank order (float64), so the result does not depend on timing."""

    def __init__(self, shards: int) -> None:
        self._barrier = threading.Barrier(shards)
        self._parts: list[np.ndarray | None] = [None] * shards

    def for_rank(self, rank: int) -> AllReduce:
        def reduce(partial: np.ndarray) -> np.ndarray:
            self._parts[rank] = np.asarray(partial, np.float64).copy()
            self._barrier.wait()
            total = np.sum([part for part in self._parts if part is not None], axis=0)
            self._barrier.wait()  # nobody overwrites a part before every shard has read all
            return total

        return reduce


def run_shards(shards: Sequence[Callable[[AllReduce], Any]]) -> list[Any]:
    """Runs ``shards[r](all_reduce_r)`` in one thread each; returns their results (or raises the
    first shard's error)."""
    reducer = ThreadAllReduce(len(shards))
    results: list[Any] = [None] * len(shards)
    errors: list[BaseException | None] = [None] * len(shards)

    def run(rank: int) -> None:
        try:
            results[rank] = shards[rank](reducer.for_rank(rank))
        except BaseException as err:  # re-raised in the caller's thread
            errors[rank] = err
            reducer._barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for err in errors:
        if err is not None:
            raise err
    return results


def _runtime_step(
    opt: runtime.ExportedOptimizer,
    state: dict[str, np.ndarray],
    grads: Sequence[np.ndarray],
    lr: float,
    chunk_size: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    ws = [np.zeros(g.size, np.float32) for g in grads]  # w' = 0 − update: the update is exact
    stepper = opt.bind(ws, lr=lr, chunk_size=chunk_size)
    saved = stepper.state_dict()
    saved["state"] = state
    stepper.load_state_dict(saved)
    stepper.step(list(grads))
    return np.concatenate(ws), stepper.state_dict()["state"], stepper.num_chunks


def _sharded_runtime_step(
    opt: runtime.ExportedOptimizer,
    state: dict[str, np.ndarray],
    grads: Sequence[np.ndarray],
    lr: float,
    chunk_size: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """The step on two shards (threads), each holding one half of every array."""
    offsets = np.cumsum([0, *(g.size for g in grads)])
    halves = [(lo, (lo + hi) // 2, hi) for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]
    coords = [
        np.concatenate([np.arange(lo, mid) for lo, mid, _ in halves]).astype(np.int64),
        np.concatenate([np.arange(mid, hi) for _, mid, hi in halves]).astype(np.int64),
    ]
    flat_grad = np.concatenate(grads)
    ids = [list(range(len(grads)))] * 2  # shard r binds the r-th half of every array

    def shard(rank: int) -> Callable[[AllReduce], Any]:
        def run(all_reduce: AllReduce) -> Any:
            pieces = [(lo, mid) if rank == 0 else (mid, hi) for lo, mid, hi in halves]
            ws = [np.zeros(hi - lo, np.float32) for lo, hi in pieces]
            stepper = opt.bind(
                ws,
                lr=lr,
                chunk_size=chunk_size,
                all_reduce=all_reduce,
                array_ids=ids[rank],
                num_arrays=len(grads),
            )
            saved = stepper.state_dict()
            saved["state"] = {
                k: (v[coords[rank]] if v.shape[:1] == (flat_grad.size,) else v)
                for k, v in state.items()
            }
            stepper.load_state_dict(saved)
            stepper.step([flat_grad[lo:hi].copy() for lo, hi in pieces])
            return np.concatenate(ws), stepper.state_dict()["state"], stepper.num_chunks

        return run

    results = run_shards([shard(0), shard(1)])
    w = np.zeros(flat_grad.size, np.float32)
    merged: dict[str, np.ndarray] = {}
    for rank, (w_r, state_r, _) in enumerate(results):
        w[coords[rank]] = w_r
        for k, v in state_r.items():
            if k in state and state[k].shape[:1] == (flat_grad.size,):
                merged.setdefault(k, np.zeros_like(state[k]))[coords[rank]] = v
            else:
                merged[k] = v
    return w, merged, results[0][2] + results[1][2]


def step_cases(
    opt: runtime.ExportedOptimizer,
    reference: LearnedUpdateRule,
    theta: dict[str, torch.Tensor],
    sizes: Sequence[int],
    seed: int,
) -> list[dict[str, Any]]:
    results = []
    lr = opt.default_lr
    per_array = bool(opt.manifest.info.array_statistics)
    for p in sizes:
        rng = np.random.default_rng([seed, p])
        layout = array_sizes(p) if per_array else [p]
        state = random_state(reference, p, rng, layout if per_array else None)
        gradients = {"random": real_gradient(p, rng), "zero": np.zeros(p, np.float32)}
        bounds = np.cumsum(layout)[:-1]
        if per_array:  # each array its own scale
            scales = np.concatenate(
                [np.full(n, ARRAY_SCALES[i % 3], np.float32) for i, n in enumerate(layout)]
            )
            gradients["random"] = gradients["random"] * scales
        paths: list[tuple[str, int, Any]] = [
            ("fused", p, _runtime_step),
            ("chunked", min(DEFAULT_CHUNK_SIZE, -(-p // 3)), _runtime_step),
        ]
        if per_array and min(layout) >= 2:  # every array split across both shards
            paths.append(("sharded", min(DEFAULT_CHUNK_SIZE, -(-p // 5)), _sharded_runtime_step))
        for kind, grad in gradients.items():
            with torch.no_grad():
                delta, expected = reference.step(theta, torch.from_numpy(grad), state, lr=lr)
            want = to_runtime_state(opt.manifest.state, expected)
            start = to_runtime_state(opt.manifest.state, state)
            grads = np.split(grad, bounds)
            extra = {}
            if per_array:
                floor = _step_floor(
                    reference, theta, grad, state, lr, delta.numpy(), want, opt.manifest.state
                )
                extra = {"fp32_vs_fp64_floor": floor, "tolerance": step_tolerance(floor)}
            for path, chunk_size, run in paths:
                w, got, chunks = run(opt, dict(start), grads, lr, chunk_size)
                errors = {mf.PARAM: relative_error(w, delta.numpy())}
                errors.update({k: relative_error(got[k], want[k]) for k in want})
                worst = max(errors, key=errors.__getitem__)
                arrays = f" in arrays of {layout}" if per_array else ""
                results.append(
                    {
                        "case": f"p={p}{arrays} {kind}-gradient {path}",
                        "chunks": chunks,
                        "max_error": errors[worst],
                        "worst_tensor": worst,
                        **extra,
                    }
                )
    return results


def step_tolerance(floor: float) -> float:
    """A per-array method's one-step tolerance: ``STEP_TOLERANCE``, or ten times the fp32
    reference's own distance from fp64 on that case when that is larger. Its gates can sit near
    1 (the Adam-reduction start has γ = 0.999): 1 − γ then carries a relative round-off of
    ulp(1)/(1 − γ) ≈ 3e-5 in any fp32 implementation, the reference's included."""
    return max(STEP_TOLERANCE, 10 * floor)


def _step_floor(
    reference: LearnedUpdateRule,
    theta: dict[str, torch.Tensor],
    grad: np.ndarray,
    state: Any,
    lr: float,
    delta: np.ndarray,
    want: dict[str, np.ndarray],
    layout: mf.StateLayout,
) -> float:
    """max over tensors of |fp32 reference − fp64 reference| / max|fp64 reference| for one step."""

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t

    with torch.no_grad():
        delta64, state64 = reference.step(
            {k: v.double() for k, v in theta.items()},
            torch.from_numpy(grad).double(),
            type(state)(*(wide(t) for t in state)),
            lr=lr,
        )
    exact = to_runtime_state(layout, state64, dtype=np.float64)
    errors = [relative_error(delta, delta64.numpy())]
    errors += [relative_error(want[k], exact[k]) for k in want]
    return max(errors)


class _TinyMLP:
    """Softmax regression through one ReLU layer (dead units give zero-gradient coordinates)."""

    shapes = ((16, 10), (16,), (4, 16), (4,))

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(64, 10, generator=g)
        self.y = torch.randint(0, 4, (64,), generator=g)
        self.w0 = torch.randn(sum(math.prod(s) for s in self.shapes), generator=g) * 0.3

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        bounds = np.cumsum([math.prod(s) for s in self.shapes])[:-1]
        return [a.reshape(s) for a, s in zip(np.split(flat, bounds), self.shapes, strict=True)]

    def loss_and_grad(self, flat: torch.Tensor, step: int) -> tuple[float, torch.Tensor]:
        """Loss and gradient at ``flat``, in ``flat``'s dtype, on minibatch ``step``."""
        rows = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(step))
        with torch.enable_grad():
            w = flat.detach().clone().requires_grad_(True)
            w1, b1, w2, b2 = (
                p.reshape(s)
                for p, s in zip(
                    w.split([math.prod(s) for s in self.shapes]), self.shapes, strict=True
                )
            )
            hidden = torch.relu(self.x[rows].to(w.dtype) @ w1.T + b1)
            loss = torch.nn.functional.cross_entropy(hidden @ w2.T + b2, self.y[rows])
            (grad,) = torch.autograd.grad(loss, w)
        return float(loss.detach()), grad


def _reference_trajectory(
    reference: LearnedUpdateRule,
    theta: dict[str, torch.Tensor],
    problem: _TinyMLP,
    steps: int,
    lr: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, Any, list[float]]:
    theta = {k: v.to(dtype) for k, v in theta.items()}
    w = problem.w0.to(dtype)
    state = init_reference_state(
        reference, w.numel(), [math.prod(shape) for shape in problem.shapes]
    )
    state = type(state)(*(t.to(dtype) if t.is_floating_point() else t for t in state))
    losses: list[float] = []
    with torch.no_grad():
        for t in range(steps):
            loss, grad = problem.loss_and_grad(w, t)
            delta, state = reference.step(theta, grad, state, lr=lr)
            w, losses = w + delta, [*losses, loss]
    return w, state, losses


def _trajectory_errors(
    layout: mf.StateLayout,
    w0: np.ndarray,
    w: np.ndarray,
    state: dict[str, np.ndarray],
    losses: list[float],
    want: tuple[np.ndarray, dict[str, np.ndarray], list[float]],
) -> dict[str, float]:
    want_w, want_state, want_losses = want
    errors = {mf.PARAM: relative_error(w - w0, want_w - w0)}
    errors.update({k: relative_error(state[k], want_state[k]) for k in want_state})
    errors["loss"] = relative_error(np.array(losses), np.array(want_losses))
    return errors


def trajectory_cases(
    opt: runtime.ExportedOptimizer,
    reference: LearnedUpdateRule,
    theta: dict[str, torch.Tensor],
    steps: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The runtime's trajectory vs the fp32 reference's, each on its own iterates.

    A trajectory amplifies round-off by however chaotic the optimizer's dynamics are (a
    DMoptimizer LSTM state drifts ~1e-3 between fp32 and fp64 in 100 steps). So the tolerance
    is ``max(TRAJECTORY_TOLERANCE, 10 × floor)``, where the floor is the distance between the
    fp32 and the fp64 reference on the same trajectory: the runtime may differ from the fp32
    reference by at most ten times what fp32 itself does.
    """
    problem, lr, layout = _TinyMLP(seed), opt.default_lr, opt.manifest.state
    w0 = problem.w0.numpy()
    runs = {}
    for dtype in (torch.float32, torch.float64):
        w, state, losses = _reference_trajectory(reference, theta, problem, steps, lr, dtype)
        runs[dtype] = (w.numpy(), to_runtime_state(layout, state, dtype=np.float64), losses)
    floor_errors = _trajectory_errors(layout, w0, *runs[torch.float32], runs[torch.float64])
    floor = max(floor_errors.values())
    tolerance = max(TRAJECTORY_TOLERANCE, 10 * floor)
    results = []
    for path, chunk_size in (("fused", None), ("chunked", 50)):
        arrays = [a.copy() for a in problem.split(w0.copy())]
        stepper = opt.bind(arrays, lr=lr, chunk_size=chunk_size)
        losses = []
        for t in range(steps):
            flat = np.concatenate([a.reshape(-1) for a in arrays])
            loss, grad = problem.loss_and_grad(torch.from_numpy(flat), t)
            losses.append(loss)
            stepper.step([g.copy() for g in problem.split(grad.numpy())])
        final = np.concatenate([a.reshape(-1) for a in arrays])
        errors = _trajectory_errors(
            layout, w0, final, stepper.state_dict()["state"], losses, runs[torch.float32]
        )
        worst = max(errors, key=errors.__getitem__)
        results.append(
            {
                "case": f"{steps}-step ReLU-MLP trajectory {path}",
                "chunks": stepper.num_chunks,
                "max_error": errors[worst],
                "worst_tensor": worst,
                "fp32_vs_fp64_floor": floor,
                "tolerance": tolerance,
            }
        )
    return results


def check_parity(
    folder: str,
    reference: LearnedUpdateRule,
    theta: dict[str, np.ndarray],
    *,
    sizes: Sequence[int],
    trajectory_steps: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs every case; returns the manifest's ``parity`` entry.

    Raises:
      ParityError: naming the worst case, its tensor and error, and the tolerance.
    """
    opt = runtime.load(folder)
    theta_t = {k: torch.from_numpy(v) for k, v in theta.items()}
    with _single_threaded_torch():
        steps = step_cases(opt, reference, theta_t, sizes, seed)
        trajectory = trajectory_cases(opt, reference, theta_t, trajectory_steps, seed)
    for case in steps:
        case.setdefault("tolerance", STEP_TOLERANCE)
    cases = steps + trajectory
    report = {
        "metric": METRIC,
        "reference": f"meta_train.optimizers ({reference.name}) in torch fp32",
        "tolerance": {
            "step": STEP_TOLERANCE
            if not opt.manifest.info.array_statistics
            else f"max({STEP_TOLERANCE:g}, 10 x fp32-vs-fp64 distance of the reference on the "
            "same step); per case under 'tolerance'",
            "trajectory": f"max({TRAJECTORY_TOLERANCE:g}, 10 x fp32-vs-fp64 drift of the "
            "reference on the same trajectory); per case under 'tolerance'",
        },
        "providers": list(opt.providers),
        "sizes": list(sizes),
        "trajectory_steps": trajectory_steps,
        "seed": seed,
        "max_error": {
            "step": max(r["max_error"] for r in steps),
            "trajectory": max((r["max_error"] for r in trajectory), default=0.0),
        },
        "cases": cases,
    }
    for case in cases:
        if not case["max_error"] <= case["tolerance"]:
            raise ParityError(
                f"parity check failed: {case['case']}: {case['worst_tensor']} differs from the "
                f"torch reference by {case['max_error']:.3e} (relative), above the tolerance "
                f"{case['tolerance']:.3g}"
            )
    report["passed"] = True
    return report
