"""runtime.per_array through the numpy Stepper: decoupled weight decay (AdamW's term, exactly)
and per-array lr multipliers inside one global step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime


@pytest.fixture(scope="module")
def opt(hyperadam_folder):
    return runtime.load(hyperadam_folder, threads=1)


def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=7).astype(np.float32)]


def grads(t: int) -> list[np.ndarray]:
    rng = np.random.default_rng(10 + t)
    return [rng.normal(size=a.shape).astype(np.float32) for a in arrays()]


def test_weight_decay_equals_adamw_exactly_when_the_learned_update_is_zero(opt):
    """Zero gradients at the first step give a learned update of exactly zero (every moment
    is zero); what is left must be torch.optim.AdamW's decay, bit for bit, per array."""
    ours = arrays()
    ref = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in ours]
    for p in ref:
        p.grad = torch.zeros_like(p)
    torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1).step()
    stepper = opt.bind(ours, lr=0.01, weight_decay=0.1)
    stepper.step([np.zeros_like(a) for a in ours])
    assert not np.array_equal(ours[0], arrays()[0])
    assert all(np.array_equal(a, p.detach().numpy()) for a, p in zip(ours, ref, strict=True))


def test_per_array_weight_decay_and_lr_multipliers(opt):
    plain, scaled = arrays(), arrays()
    a = opt.bind(plain, lr=0.01)
    b = opt.bind(scaled, lr=0.01, weight_decay=[0.0, 0.0])
    b.lr_scales = [1.0, 0.25]
    for t in range(3):
        a.step(grads(t))
        b.step(grads(t))
    assert np.array_equal(scaled[0], plain[0])  # multiplier 1: untouched, bit for bit
    np.testing.assert_allclose(arrays()[1] - scaled[1], 0.25 * (arrays()[1] - plain[1]),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    b.weight_decay = [0.5, 0.0]
    assert b.weight_decay == [0.5, 0.0]
    before = [x.copy() for x in scaled]
    b.lr_scales = [0.0, 0.0]  # a warm-up's lr of 0: nothing moves, not even by decay
    b.step(grads(3))
    assert all(np.array_equal(x, y) for x, y in zip(before, scaled, strict=True))


BAD = [
    ("weight_decay", -0.1, ValueError, r"^weight_decay must be a finite number >= 0, got -0\.1$"),
    ("weight_decay", [0.1], ValueError, r"^weight_decay must be one number or one per parameter"),
    ("weight_decay", "0.1", TypeError, r"^weight_decay must be a real number, got str$"),
    ("lr_scales", [1.0, float("nan")], ValueError, r"^lr_scales must be finite numbers >= 0"),
]


@pytest.mark.parametrize("name, value, error, message", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_values_are_refused_and_change_nothing(opt, name, value, error, message):
    stepper = opt.bind(arrays())
    with pytest.raises(error, match=message):
        setattr(stepper, name, value)
    assert stepper.weight_decay == 0.0 and stepper.lr_scales == [1.0, 1.0]
