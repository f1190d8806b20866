"""θ files as torch reference optimizers: the architecture a θ implies, checked, and its tensors.

A θ file (``runtime.theta``'s format) names its method and holds its meta-parameters; the
sizes of the network (HyperAdam's J, DMoptimizer's and RNNprop's H) follow from the tensors'
shapes. ``reference_for_theta`` infers them and checks every name and shape against the
``meta_train`` optimizer so built; ``load_theta_source`` reads a file, a folder or a built-in
name into that optimizer and θ as torch tensors. Export uses the same check before it builds
graphs, so a θ that loads here is one that exports.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import torch

from runtime import manifest as mf
from runtime.theta import load_theta, theta_path

from .optimizers import DMOptimizer, HyperAdam, LearnedUpdateRule, RNNprop, Theta
from .optimizers.hyperadam_tensor import TensorwiseHyperAdam


def _size(theta: Mapping[str, np.ndarray], name: str, divisor: int = 1) -> int:
    if name not in theta or theta[name].ndim != 1:
        raise ValueError(f"theta needs a vector {name!r} to infer its sizes")
    return int(theta[name].shape[0]) // divisor


SizesFromTheta = Callable[[Mapping[str, np.ndarray]], dict[str, int]]
# method → (θ → the sizes that build it, sizes → the optimizer). A bias vector gives each size:
# HyperAdam's pre_bias has J entries, RNNprop's H, DMoptimizer's first LSTM bias 4H.
_ARCHITECTURES: dict[str, tuple[SizesFromTheta, Callable[..., LearnedUpdateRule]]] = {
    mf.HYPERADAM: (
        lambda theta: {"num_candidates": _size(theta, "pre_bias")},
        lambda num_candidates: HyperAdam(num_candidates),
    ),
    mf.DM: (
        lambda theta: {"hidden_size": _size(theta, "lstm1_bias", 4)},
        lambda hidden_size: DMOptimizer(hidden_size),
    ),
    mf.RNNPROP: (
        lambda theta: {"hidden_size": _size(theta, "pre_bias")},
        lambda hidden_size: RNNprop(hidden_size),
    ),
    mf.HYPERADAM_TENSOR: (
        lambda theta: {"num_candidates": _size(theta, "pre_bias")},
        lambda num_candidates: TensorwiseHyperAdam(num_candidates, bounded=True),
    ),
    mf.HYPERADAM_TENSOR_UNBOUNDED: (
        lambda theta: {"num_candidates": _size(theta, "pre_bias")},
        lambda num_candidates: TensorwiseHyperAdam(num_candidates, bounded=False),
    ),
    mf.HYPERADAM_TENSOR_ADAPTIVE: (
        lambda theta: {"num_candidates": _size(theta, "pre_bias")},
        lambda num_candidates: TensorwiseHyperAdam(num_candidates, adaptive_scale=True),
    ),
    mf.HYPERADAM_TENSOR_TREND: (
        lambda theta: {"num_candidates": _size(theta, "pre_bias")},
        lambda num_candidates: TensorwiseHyperAdam(
            num_candidates, adaptive_scale=True, scale_reference="trend"
        ),
    ),
    mf.HYPERADAM_TENSOR_TREND_ANNEALED: (
        lambda theta: {"num_candidates": _size(theta, "pre_bias")},
        lambda num_candidates: TensorwiseHyperAdam(
            num_candidates, adaptive_scale=True, scale_reference="trend", anneal_rate=True
        ),
    ),
}


def reference_for_theta(
    method: str, theta: Mapping[str, np.ndarray]
) -> tuple[dict[str, int], LearnedUpdateRule]:
    """Infers the architecture from θ and checks every name and shape against it.

    Args:
      method: a learned optimizer's name (``runtime.manifest.METHODS``).
      theta: its meta-parameters as numpy arrays.

    Returns:
      ``(config, reference)``: the sizes (e.g. ``{"num_candidates": 20}``) and the torch
      optimizer they build.

    Raises:
      ValueError: naming the method, and the missing, unexpected, misshapen or non-finite
        tensors.
    """
    if method not in _ARCHITECTURES:
        raise ValueError(f"method must be one of {sorted(_ARCHITECTURES)}, got {method!r}")
    config_from_theta, build = _ARCHITECTURES[method]
    config = config_from_theta(theta)
    reference = build(**config)
    shapes = reference.theta_shapes()
    if set(shapes) != set(theta):
        raise ValueError(
            f"theta for {method} {config} must have tensors {sorted(shapes)}: missing "
            f"{sorted(set(shapes) - set(theta))}, unexpected {sorted(set(theta) - set(shapes))}"
        )
    for name, shape in shapes.items():
        if tuple(theta[name].shape) != tuple(shape):
            raise ValueError(
                f"theta[{name!r}] has shape {tuple(theta[name].shape)}, {method} {config} "
                f"needs {tuple(shape)}"
            )
        if not np.isfinite(theta[name]).all():
            raise ValueError(f"theta[{name!r}] contains NaN or inf")
    return config, reference


def load_theta_source(source: str | os.PathLike[str]) -> tuple[LearnedUpdateRule, Theta]:
    """θ for the torch reference from a file, a folder or a built-in name.

    Args:
      source: a θ file (``.npz`` of ``runtime.theta.save_theta``); a folder holding
        ``theta.npz`` (a meta-training ``theta/best`` folder or an exported-optimizer folder);
        or a learned optimizer's name, meaning the θ shipped in ``runtime/builtin/NAME``.

    Returns:
      ``(optimizer, theta)``: the ``meta_train`` learned optimizer sized from θ, and θ as torch
      tensors, ready for ``optimizer.bind(theta, lr=...)``.

    Raises:
      FileNotFoundError: nothing at ``source`` (for a name: no θ shipped under that name).
      ValueError: a file that is not a θ artifact, or θ that does not fit its method.
    """
    artifact = load_theta(theta_path(source))
    _, optimizer = reference_for_theta(artifact.method, artifact.theta)
    return optimizer, {name: torch.from_numpy(a.copy()) for name, a in artifact.theta.items()}
