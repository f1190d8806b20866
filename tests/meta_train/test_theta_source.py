"""meta_train.theta_source: a θ file, folder or built-in name → the torch reference optimizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meta_train.optimizers import HyperAdam, RNNprop
from meta_train.seeding import generator
from meta_train.theta_source import load_theta_source, reference_for_theta
from runtime.theta import save_theta


def test_theta_source_gives_the_reference_optimizer(tmp_path):
    theta = RNNprop(6).init_theta(generator(1))
    save_theta(tmp_path / "theta.npz", "rnnprop", theta)
    for source in (tmp_path / "theta.npz", tmp_path):
        optimizer, loaded = load_theta_source(source)
        assert isinstance(optimizer, RNNprop) and optimizer.hidden_size == 6
        assert all(torch.equal(loaded[k], theta[k]) for k in theta)
    with pytest.raises(FileNotFoundError, match=r"^no θ artifact at "):
        load_theta_source(tmp_path / "missing.npz")


def test_builtin_name_gives_the_shipped_hyperadam():
    optimizer, theta = load_theta_source("hyperadam")
    assert isinstance(optimizer, HyperAdam) and set(theta) == set(optimizer.theta_shapes())


@pytest.mark.parametrize(
    ("method", "theta", "match"),
    [
        ("adam", {}, r"^method must be one of \['dm', 'hyperadam', .*'rnnprop'\], got 'adam'$"),
        ("rnnprop", {"pre_bias": np.zeros((2, 2))}, r"^theta needs a vector 'pre_bias'"),
        ("hyperadam", {"pre_bias": np.zeros(3)}, r"^theta for hyperadam \{'num_candidates': 3\}"),
    ],
    ids=["unknown-method", "matrix-bias", "missing-tensors"],
)
def test_theta_that_does_not_fit_its_method_is_refused(method, theta, match):
    with pytest.raises(ValueError, match=match):
        reference_for_theta(method, theta)


def test_non_finite_theta_is_refused():
    theta = {k: v.numpy().copy() for k, v in HyperAdam(2).init_theta(generator(0)).items()}
    theta["pre_bias"][0] = np.nan
    with pytest.raises(ValueError, match=r"^theta\['pre_bias'\] contains NaN or inf$"):
        reference_for_theta("hyperadam", theta)
