"""The inference-θ artifact: a learned optimizer's meta-parameters in a small, safe file.

The contract between meta-training (which writes θ), export (which turns θ into graphs) and the
runtime (which keeps θ beside the graphs, ``manifest.THETA_FILE``); so it lives here, beside the
other formats, and needs numpy only. Separate from the full trainer checkpoint (style §6.14):
just θ, the method name and lineage. The file is a numpy ``.npz`` read with
``allow_pickle=False`` (no code runs on load): one fp32 array per meta-parameter under
``theta/NAME`` and a UTF-8 JSON header under ``__header__``::

    {"format": "hyperadam.theta", "format_version": 1, "method": "hyperadam",
     "names": ["pre_kernel", ...], "meta": {"mlflow_run_id": ..., "step": ..., ...}}

Turning a θ file into the torch reference optimizer is ``meta_train.theta_source``'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import manifest as mf
from .sources import BUILTIN_DIR

THETA_FORMAT = "hyperadam.theta"
THETA_FORMAT_VERSION = 1
_HEADER = "__header__"
_PREFIX = "theta/"


@dataclasses.dataclass(frozen=True)
class ThetaArtifact:
    """θ as fp32 numpy arrays (in the file's order), its method and JSON metadata."""

    method: str
    theta: dict[str, np.ndarray]
    meta: dict[str, Any]


def as_numpy_theta(theta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """fp32, C-contiguous numpy copies of θ given as numpy arrays or torch tensors."""
    if not isinstance(theta, Mapping) or not theta:
        raise TypeError(f"theta must be a non-empty mapping of name → array, got {type(theta)}")
    out = {}
    for name, value in theta.items():
        if hasattr(value, "detach"):  # a torch tensor; no torch import needed to convert it
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise ValueError(f"theta[{name!r}] must be floating point, got dtype {array.dtype}")
        out[str(name)] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def theta_sha256(theta: Mapping[str, np.ndarray]) -> str:
    """Digest of θ (names, shapes and fp32 bytes, in order): the lineage of an export."""
    digest = hashlib.sha256()
    for name, array in theta.items():
        digest.update(json.dumps([name, list(array.shape)]).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def save_theta(path: str | os.PathLike[str], method: str, theta: Mapping[str, Any], **meta) -> Path:
    """Writes θ of ``method`` with JSON-serialisable ``meta`` (e.g. ``mlflow_run_id``,
    ``step``, ``task_digest``) to ``path`` atomically (a partial file is never visible).

    Raises:
      TypeError / ValueError: on non-float θ or meta that is not JSON-serialisable.
    """
    arrays = as_numpy_theta(theta)
    header = {
        "format": THETA_FORMAT,
        "format_version": THETA_FORMAT_VERSION,
        "method": str(method),
        "names": list(arrays),
        "meta": meta,
    }
    try:
        header_bytes = json.dumps(header, sort_keys=True).encode()
    except TypeError as err:
        raise TypeError(f"theta meta must be JSON-serialisable: {err}") from None
    path = Path(path)
    payload: dict[str, Any] = {_PREFIX + name: array for name, array in arrays.items()}
    payload[_HEADER] = np.frombuffer(header_bytes, dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_theta(path: str | os.PathLike[str]) -> ThetaArtifact:
    """Reads a file written by ``save_theta`` (never unpickles).

    Raises:
      ValueError: if the file is not a θ artifact of a known format version, or its arrays do
        not match its header.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            files = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # BadZipFile: a truncated .npz
        raise ValueError(f"{path} is not a θ artifact (.npz): {err}") from None
    if _HEADER not in files:
        raise ValueError(f"{path} has no {_HEADER} entry: not written by save_theta")
    try:
        header = json.loads(files.pop(_HEADER).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable header ({err})") from None
    if header.get("format") != THETA_FORMAT or header.get("format_version") != THETA_FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {header.get('format')!r} version {header.get('format_version')!r} "
            f"is not supported (expected {THETA_FORMAT!r} version {THETA_FORMAT_VERSION})"
        )
    names = header["names"]
    stored = sorted(n[len(_PREFIX) :] for n in files)
    if sorted(names) != stored:
        raise ValueError(f"{path}: header lists {sorted(names)} but the file holds {stored}")
    theta = {name: files[_PREFIX + name] for name in names}
    for name, array in theta.items():
        if array.dtype != np.float32:
            raise ValueError(f"{path}: theta[{name!r}] has dtype {array.dtype}, expected float32")
    return ThetaArtifact(header["method"], theta, dict(header["meta"]))


def theta_path(source: str | os.PathLike[str]) -> Path:
    """The θ file a source names: a file, a folder holding ``theta.npz``, or a built-in name.

    An exported-optimizer folder (one with ``manifest.json``, the built-ins included) is
    verified first, as ``runtime.load`` would: a swapped θ or a tampered file is refused, not
    read.

    Raises:
      FileNotFoundError: nothing at ``source`` (for a name: no θ shipped under that name).
      ManifestError: an exported folder that fails verification.
    """
    path = Path(source)
    if isinstance(source, str) and source in mf.METHODS and not path.exists():
        path = BUILTIN_DIR / source
        if not (path / mf.THETA_FILE).is_file():
            raise FileNotFoundError(f"no built-in θ for {source!r} is shipped in {BUILTIN_DIR}")
    if path.is_dir():
        if (path / mf.MANIFEST_FILE).is_file():
            mf.load_manifest(path)
        path = path / mf.THETA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no θ artifact at {path}")
    return path
