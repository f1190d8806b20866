"""Where θ's file format used to live; kept so that old imports keep working.

The format is ``runtime.theta`` (numpy only, the contract between training, export and the
runtime); reading a θ into the torch reference is ``meta_train.theta_source``.
"""

from meta_train.theta_source import load_theta_source
from runtime.theta import (
    THETA_FORMAT,
    THETA_FORMAT_VERSION,
    ThetaArtifact,
    as_numpy_theta,
    load_theta,
    save_theta,
    theta_path,
    theta_sha256,
)

__all__ = [
    "THETA_FORMAT",
    "THETA_FORMAT_VERSION",
    "ThetaArtifact",
    "as_numpy_theta",
    "load_theta",
    "load_theta_source",
    "save_theta",
    "theta_path",
    "theta_sha256",
]
