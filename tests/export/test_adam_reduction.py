"""Through onnxruntime, constant decays and one candidate reduce HyperAdam to Adam (spec §2.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import runtime
from export import export_optimizer
from meta_train.optimizers import HyperAdam
from meta_train.optimizers.hyperadam import MOMENT_EPS
from meta_train.seeding import generator


def adam_theta(beta1: float, beta2: float) -> dict:
    """Decay kernel 0, decay bias logit(β1) | logit(β2); weight kernel 0, ρ = one-hot(0)."""
    theta = HyperAdam().init_theta(generator(0))  # random StateCell: must not matter
    theta["decay_kernel"].zero_()
    theta["decay_bias"] = torch.cat(
        [
            torch.full((20,), math.log(beta1 / (1 - beta1))),
            torch.full((20,), math.log(beta2 / (1 - beta2))),
        ]
    )
    theta["weight_kernel"].zero_()
    theta["weight_bias"] = torch.zeros(20)
    theta["weight_bias"][0] = 1.0  # ELU(1) = 1 for candidate 0, ELU(0) = 0 for the others
    return theta


@pytest.mark.parametrize("chunk_size", [None, 9], ids=["fused", "chunked"])
def test_runtime_steps_are_adam_with_bias_correction_and_eps_inside_the_root(tmp_path, chunk_size):
    theta = adam_theta(0.9, 0.999)
    export_optimizer("hyperadam", theta, tmp_path / "adam", parity_sizes=(2,), trajectory_steps=2)
    # the β, γ the graph really produces in fp32
    b1 = float(torch.sigmoid(theta["decay_bias"][0]).double())
    b2 = float(torch.sigmoid(theta["decay_bias"][-1]).double())
    lr, p = 0.01, 40
    params = [np.zeros((5, 4), np.float32), np.zeros(20, np.float32)]
    stepper = runtime.load(tmp_path / "adam").bind(params, lr=lr, chunk_size=chunk_size)
    rng = np.random.default_rng(5)
    m = np.zeros(p)
    v = np.zeros(p)
    for t in range(1, 31):
        grad = (rng.normal(size=p) * rng.uniform(0, 3, p)).astype(np.float32)
        grad[::7] = 0.0  # coordinates that never see a gradient: ε keeps them finite, at 0
        before = np.concatenate([a.reshape(-1) for a in params]).astype(np.float64)
        stepper.step([grad[:20].reshape(5, 4).copy(), grad[20:].copy()])
        after = np.concatenate([a.reshape(-1) for a in params]).astype(np.float64)
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad.astype(np.float64) ** 2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        expected = -lr * m_hat / np.sqrt(v_hat + MOMENT_EPS)
        np.testing.assert_allclose(after - before, expected, rtol=2e-4, atol=2e-8)
        assert np.all(after[::7] == 0.0)
