"""Per-method export facts: θ → config, the torch reference, and the graph builder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx

from meta_train.optimizers import DMOptimizer, HyperAdam, LearnedOptimizer, RNNprop
from runtime import manifest as mf

from .coordinatewise_graphs import build_dm_graphs, build_rnnprop_graphs
from .hyperadam_graphs import build_hyperadam_graphs


@dataclasses.dataclass(frozen=True)
class ExportMethod:
    """How to export one learned optimizer."""

    config_from_theta: Callable[[dict[str, np.ndarray]], dict[str, int]]
    reference: Callable[..., LearnedOptimizer]  # (**config) -> the meta_train optimizer
    build: Callable[[dict[str, np.ndarray]], dict[str, onnx.ModelProto]]


def _size(theta: dict[str, np.ndarray], name: str, divisor: int = 1) -> int:
    if name not in theta or theta[name].ndim != 1:
        raise ValueError(f"theta needs a vector {name!r} to infer its sizes")
    return int(theta[name].shape[0]) // divisor


EXPORT_METHODS: dict[str, ExportMethod] = {
    mf.HYPERADAM: ExportMethod(
        lambda theta: {"num_candidates": _size(theta, "pre_bias")},
        lambda num_candidates: HyperAdam(num_candidates),
        build_hyperadam_graphs,
    ),
    mf.DM: ExportMethod(
        lambda theta: {"hidden_size": _size(theta, "lstm1_bias", 4)},
        lambda hidden_size: DMOptimizer(hidden_size),
        build_dm_graphs,
    ),
    mf.RNNPROP: ExportMethod(
        lambda theta: {"hidden_size": _size(theta, "pre_bias")},
        lambda hidden_size: RNNprop(hidden_size),
        build_rnnprop_graphs,
    ),
}


def _tensorwise(bounded: bool) -> ExportMethod:
    from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam

    def no_graphs(theta: dict[str, np.ndarray]) -> dict[str, onnx.ModelProto]:
        raise ValueError(
            "the tensor-wise HyperAdam variant has no ONNX export yet (issue 15); "
            "evaluate its θ file with hyperadam benchmark/evaluate"
        )

    return ExportMethod(
        lambda theta: {"num_candidates": _size(theta, "pre_bias")},
        lambda num_candidates: TensorwiseHyperAdam(num_candidates, bounded=bounded),
        no_graphs,
    )


# Methods whose θ files load for evaluation in meta_train but that are not exported (yet).
EXPERIMENTAL_METHODS: dict[str, ExportMethod] = {
    "hyperadam-tensor": _tensorwise(bounded=True),
    "hyperadam-tensor-unbounded": _tensorwise(bounded=False),
}


def check_theta(
    method: str, theta: dict[str, np.ndarray]
) -> tuple[dict[str, int], LearnedOptimizer]:
    """Infers the config from θ and checks every name and shape against the reference.

    Raises:
      ValueError: naming the method, and the missing, unexpected or misshapen tensors.
    """
    known = {**EXPORT_METHODS, **EXPERIMENTAL_METHODS}
    if method not in known:
        raise ValueError(f"method must be one of {sorted(known)}, got {method!r}")
    spec = known[method]
    config = spec.config_from_theta(theta)
    reference = spec.reference(**config)
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
