"""A learning-rate schedule through ``stepper.lr`` (the torch and optax schedules are tested with
their adapters): lr only scales the learned direction, so the same gradients give steps whose
sizes follow the schedule while the state follows the constant-lr run exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

import runtime


@pytest.fixture(scope="module")
def opt(hyperadam_folder):
    return runtime.load(hyperadam_folder, threads=1)


def warmup_cosine(t: int, peak: float = 0.01, warmup: int = 3, total: int = 8) -> float:
    if t < warmup:
        return peak * (t + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_stepper_lr_follows_a_schedule_between_steps(opt):
    scheduled, constant = np.zeros(40, np.float32), np.zeros(40, np.float32)
    a, b = opt.bind([scheduled], lr=0.01), opt.bind([constant], lr=0.01)
    sizes, base, lrs = [], [], []
    for t in range(7):
        grad = np.random.default_rng(t).normal(size=40).astype(np.float32)
        a.lr = warmup_cosine(t)
        lrs.append(a.lr)
        before_a, before_b = scheduled.copy(), constant.copy()
        a.step([grad])
        b.step([grad])
        sizes.append(np.linalg.norm(scheduled - before_a))
        base.append(np.linalg.norm(constant - before_b))
    assert len(set(lrs)) == 6  # warm-up 1/3, 2/3, 1, then the cosine from 1 down
    np.testing.assert_allclose(sizes, np.array(base) * np.array(lrs) / 0.01, rtol=1e-4)
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
