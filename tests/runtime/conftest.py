"""Exported folders shared by the runtime tests (one small export per method and session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export import export_optimizer
from meta_train.optimizers import make_learned_optimizer
from meta_train.seeding import generator

METHODS = ("hyperadam", "dm", "rnnprop")


def theta_for(method: str, seed: int = 0) -> dict:
    return make_learned_optimizer(method).init_theta(generator(seed))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """method → folder; parity kept small here (tests/export runs the full check)."""
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for method in METHODS:
        folders[method] = root / method
        export_optimizer(
            method, theta_for(method), folders[method], parity_sizes=(2,), trajectory_steps=3
        )
    return folders


@pytest.fixture(scope="session")
def hyperadam_folder(exported):
    return exported["hyperadam"]


# The step-scale rate in the adaptive and trend variants' test θ: κ = KAPPA_MAX·σ(0) = 0.1, five
# times the meta-training start's, so that ℓ moves by up to ±2.5 in 25 steps.
ADAPTIVE_SCALE_RATE_LOGIT = 0.0
# The annealed variant's early rate: κ₀ = 0.2·σ(3) ≈ 0.19, which κ_t relaxes from to κ over
# ~100 steps (so across the tests' 25 steps it is well away from κ).
ANNEALED_EARLY_RATE_LOGIT = 3.0


@pytest.fixture(scope="session")
def tensorwise_theta(tmp_path_factory):
    """method → a θ file of the tensor-wise variant: trained (``python -m meta_train.ablation``),
    bounded and with ELU weights; the adaptive and trend variants' are the trained bounded θ's
    cells with a step-scale rate (their only θ in the repository are Adam-reduction starts,
    whose cells do not reach the step weights ρ)."""
    from runtime.theta import load_theta, save_theta

    ablation = Path(__file__).resolve().parents[2] / "checkpoints" / "ablation"
    bounded = ablation / "tensor-small-log" / "theta.npz"
    theta = dict(load_theta(bounded).theta)
    theta["scale_rate"] = np.full((1,), ADAPTIVE_SCALE_RATE_LOGIT, np.float32)
    scaled = {}
    for method in ("hyperadam-tensor-adaptive", "hyperadam-tensor-trend"):
        scaled[method] = tmp_path_factory.mktemp(method) / "theta.npz"
        save_theta(scaled[method], method, theta)
    annealed = "hyperadam-tensor-trend-annealed"
    scaled[annealed] = tmp_path_factory.mktemp(annealed) / "theta.npz"
    early = np.full((1,), ANNEALED_EARLY_RATE_LOGIT, np.float32)
    save_theta(scaled[annealed], annealed, {**theta, "scale_rate_early": early})
    return {
        "hyperadam-tensor": bounded,
        "hyperadam-tensor-unbounded": ablation / "tensor-unbounded-small-log" / "theta.npz",
        **scaled,
    }


@pytest.fixture(scope="session")
def tensorwise_folders(tmp_path_factory, tensorwise_theta):
    """method → the exported folder of its trained θ (parity kept small here)."""
    out = tmp_path_factory.mktemp("tensorwise")
    for method, path in tensorwise_theta.items():
        export_optimizer(method, path, out / method, parity_sizes=(2,), trajectory_steps=3)
    return {method: out / method for method in tensorwise_theta}


@pytest.fixture(autouse=True)
def single_threaded_torch():
    """Tiny reference computations: torch threads only add contention on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
