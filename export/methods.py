"""Per-method export facts: which graph builder turns a method's θ into ONNX graphs.

What a θ means (its architecture, checked name by name) is ``meta_train.theta_source``'s; this
module only adds how each method is exported.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import onnx

from runtime import manifest as mf

from .coordinatewise_graphs import build_dm_graphs, build_rnnprop_graphs
from .hyperadam_graphs import build_hyperadam_graphs
from .tensorwise_graphs import build_tensorwise_graphs

BuildGraphs = Callable[[dict[str, np.ndarray]], dict[str, onnx.ModelProto]]

# method → θ (checked by ``meta_train.theta_source.reference_for_theta``) → graphs by role.
EXPORT_METHODS: dict[str, BuildGraphs] = {
    mf.HYPERADAM: build_hyperadam_graphs,
    mf.DM: build_dm_graphs,
    mf.RNNPROP: build_rnnprop_graphs,
    mf.HYPERADAM_TENSOR: partial(build_tensorwise_graphs, bounded=True),
    mf.HYPERADAM_TENSOR_UNBOUNDED: partial(build_tensorwise_graphs, bounded=False),
    mf.HYPERADAM_TENSOR_ADAPTIVE: partial(build_tensorwise_graphs, bounded=True, adaptive=True),
    mf.HYPERADAM_TENSOR_TREND: partial(
        build_tensorwise_graphs, bounded=True, adaptive=True, scale_reference="trend"
    ),
    mf.HYPERADAM_TENSOR_TREND_ANNEALED: partial(
        build_tensorwise_graphs,
        bounded=True,
        adaptive=True,
        scale_reference="trend",
        anneal_rate=True,
    ),
}
