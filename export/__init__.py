"""hyperadam export: θ → ONNX step graphs + manifest, verified against the torch reference.

``export_optimizer(method, theta, out_dir)`` writes the folder that ``runtime.load`` reads
(format: ``runtime.manifest``); ``save_theta`` / ``load_theta`` read and write the small
inference-θ artifact that meta-training produces.
"""

from runtime.theta import ThetaArtifact, load_theta, save_theta

from .exporter import DEFAULT_PARITY_SIZES, FULL_PARITY_SIZES, export_optimizer
from .parity import ParityError

__all__ = [
    "DEFAULT_PARITY_SIZES",
    "FULL_PARITY_SIZES",
    "ParityError",
    "ThetaArtifact",
    "export_optimizer",
    "load_theta",
    "save_theta",
]
