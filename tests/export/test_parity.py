"""export.parity: the metric, and fused == staged == torch on a model that spans many chunks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import runtime
from export import export_optimizer
from export.parity import random_state, real_gradient, relative_error, to_runtime_state
from meta_train.optimizers import make_learned_optimizer
from meta_train.seeding import generator
from runtime.plan import DEFAULT_CHUNK_SIZE, plan_chunks


def test_relative_error_is_inf_norm_relative_and_refuses_nonfinite():
    assert relative_error(np.array([1.0, 2.1]), np.array([1.0, 2.0])) == pytest.approx(0.05)
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.array([np.nan]), np.array([1.0])) == math.inf


@pytest.mark.parametrize("method", ["hyperadam", "rnnprop"])
def test_fused_staged_and_torch_agree_on_a_multi_array_model(tmp_path, method):
    reference = make_learned_optimizer(method)
    theta = reference.init_theta(generator(1))
    export_optimizer(method, theta, tmp_path / "o", parity_sizes=(2,), trajectory_steps=2)
    opt = runtime.load(tmp_path / "o")
    shapes = [(3, 1700), (7,), (4097,), (2, 3)]  # 9211 coordinates: zero-copy and packed chunks
    p = sum(math.prod(s) for s in shapes)
    rng = np.random.default_rng(2)
    state, grad = random_state(reference, p, rng), real_gradient(p, rng)
    with torch.no_grad():
        delta, expected = reference.step(
            theta, torch.from_numpy(grad), state, lr=reference.default_lr
        )
        # The same step in float64: the truth both fp32 implementations are judged against.
        exact_delta, exact = reference.step(
            {k: v.double() for k, v in theta.items()},
            torch.from_numpy(grad).double(),
            type(state)(*(s.double() for s in state)),
            lr=reference.default_lr,
        )
    want = to_runtime_state(opt.manifest.state, expected)
    truth = to_runtime_state(opt.manifest.state, exact, dtype=np.float64)

    # fp32 round-off: the runtime may be off the float64 truth by twice what the torch fp32
    # reference is (RNNprop's first LSTM layer: ~5e-6 for both on an AVX2 host, where the two
    # fp32 results differ by ~3e-6), and never by more than 2e-6 where torch is closer than that.
    def round_off_bound(key: str) -> float:
        return max(2e-6, 2 * relative_error(want[key], truth[key]))

    update_bound = max(2e-6, 2 * relative_error(delta.numpy(), exact_delta.numpy()))
    bounds = np.cumsum([math.prod(s) for s in shapes])[:-1]
    results = []
    for chunk_size in (None, p, 1000):
        params = [np.zeros(s, np.float32) for s in shapes]
        stepper = opt.bind(params, chunk_size=chunk_size)
        saved = stepper.state_dict()
        saved["state"] = to_runtime_state(opt.manifest.state, state)
        stepper.load_state_dict(saved)
        stepper.step(
            [g.reshape(s).copy() for g, s in zip(np.split(grad, bounds), shapes, strict=True)]
        )
        got = stepper.state_dict()["state"]
        update = np.concatenate([a.reshape(-1) for a in params])
        assert relative_error(update, exact_delta.numpy()) < update_bound
        for key in want:
            assert relative_error(got[key], truth[key]) < round_off_bound(key), key
        results.append((stepper.num_chunks, update))
    default_chunks = len(plan_chunks([math.prod(s) for s in shapes], DEFAULT_CHUNK_SIZE))
    assert default_chunks > 2  # several zero-copy chunks and packed ones at the default size
    assert [n for n, _ in results] == [default_chunks, 1, 13]
    assert relative_error(results[0][1], results[1][1]) < 2e-6  # chunked vs fused
